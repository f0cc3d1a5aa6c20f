#pragma once
#include <sstream>
#include <stdexcept>

// Cheap invariants re-checked on the native side; pybind11 turns std::invalid_argument into ValueError.
#define DANLU_CHECK(cond, ...)                       \
  do {                                               \
    if (!(cond)) {                                   \
      std::ostringstream danlu_msg_;                 \
      danlu_msg_ << "danlu._C: " << __VA_ARGS__;     \
      throw std::invalid_argument(danlu_msg_.str()); \
    }                                                \
  } while (0)
