// The one pybind11 module: thin wrappers, no logic (docs/design.md principle 1).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>

#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "common/multi_tensor.h"
#include "dropout/dropout.h"
#include "norm/batch_norm.h"
#include "norm/batch_norm_math.h"
#include "optim/optim.h"
#ifdef DANLU_WITH_CUDA
#include "common/cuda_runtime.h"
#endif

namespace py = pybind11;
using danlu::BatchNormArgs;
using danlu::DropoutArgs;
using danlu::StepArgs;

PYBIND11_MODULE(_C, m) {
  m.doc() = "danlu native kernels: raw pointers in, no libtorch";

  // Codes the Python side shares with the kernels, defined once in the headers and exported from here.
  using Codes = std::map<std::string, int>;
  m.attr("dtype_codes") = Codes{{"float32", int(danlu::DType::Float32)},
                                {"float64", int(danlu::DType::Float64)},
                                {"float16", int(danlu::DType::Float16)},
                                {"bfloat16", int(danlu::DType::BFloat16)}};
  m.attr("optim_kinds") = Codes{{"Adam", int(danlu::OptimKind::Adam)},
                                {"SGD", int(danlu::OptimKind::Sgd)},
                                {"RMSprop", int(danlu::OptimKind::Rmsprop)},
                                {"Adagrad", int(danlu::OptimKind::Adagrad)}};
  m.attr("table_rows") = Codes{{"param", danlu::kParamRow}, {"grad", danlu::kGradRow},   {"state", danlu::kStateRow},
                               {"step", danlu::kStepRow},   {"numel", danlu::kNumelRow}, {"offset", danlu::kOffsetRow},
                               {"flags", danlu::kFlagsRow}};
  m.attr("table_num_rows") = int(danlu::kNumRows);
  m.attr("table_max_states") = danlu::kMaxStates;
  m.attr("table_first_step_flag") = int(danlu::kFirstStep);
  m.attr("table_block_elems") = danlu::kCudaElemsPerBlock;

  m.def("cpu_isa", [] { return danlu::cpu_isa_name(danlu::cpu_isa()); });
  m.def("set_cpu_isa", &danlu::set_cpu_isa, py::arg("name"));

#ifdef DANLU_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.def("cuda_device_count", &danlu::cuda_device_count);
#else
  m.attr("built_with_cuda") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
  // What this build is: the values come from CMakeLists.txt; lists are space-separated words there.
  m.def("build_info", [] {
    const auto words = [](const char* text) { return py::str(text).attr("split")(); };
    const auto known = [](const char* text) { return *text ? py::object(py::str(text)) : py::object(py::none()); };
    py::dict info;
    info["version"] = DANLU_BUILD_VERSION;
    info["commit"] = known(DANLU_BUILD_COMMIT);
    info["build_type"] = DANLU_BUILD_TYPE;
    info["compiler"] = DANLU_BUILD_COMPILER;
    info["cpu_isas"] = words(DANLU_BUILD_CPU_ISAS);
    info["cuda"] = *DANLU_BUILD_CUDA_ARCHS != '\0';  // CMakeLists.txt lists archs exactly when CUDA is built
    info["cuda_version"] = known(DANLU_BUILD_CUDA_VERSION);
    info["cuda_archs"] = words(DANLU_BUILD_CUDA_ARCHS);
    info["sanitize"] = words(DANLU_BUILD_SANITIZE);
    return info;
  });

  py::class_<StepArgs>(m, "StepArgs")
      .def(py::init<>())
      .def_readwrite("kind", &StepArgs::kind)
      .def_readwrite("dtype", &StepArgs::dtype)
      .def_readwrite("lr", &StepArgs::lr)
      .def_readwrite("beta1", &StepArgs::beta1)
      .def_readwrite("beta2", &StepArgs::beta2)
      .def_readwrite("eps", &StepArgs::eps)
      .def_readwrite("weight_decay", &StepArgs::weight_decay)
      .def_readwrite("momentum", &StepArgs::momentum)
      .def_readwrite("dampening", &StepArgs::dampening)
      .def_readwrite("alpha", &StepArgs::alpha)
      .def_readwrite("lr_decay", &StepArgs::lr_decay)
      .def_readwrite("maximize", &StepArgs::maximize)
      .def_readwrite("decoupled_weight_decay", &StepArgs::decoupled_weight_decay)
      .def_readwrite("amsgrad", &StepArgs::amsgrad)
      .def_readwrite("nesterov", &StepArgs::nesterov)
      .def_readwrite("centered", &StepArgs::centered)
      .def_readwrite("table", &StepArgs::table)
      .def_readwrite("num_tensors", &StepArgs::num_tensors)
      .def_readwrite("total", &StepArgs::total)
      .def_readwrite("block_first_tensor", &StepArgs::block_first_tensor)
      .def_readwrite("num_blocks", &StepArgs::num_blocks)
      .def_readwrite("lr_ptr", &StepArgs::lr_ptr)
      .def_readwrite("lr_is_double", &StepArgs::lr_is_double)
      .def_readwrite("grad_scale_ptr", &StepArgs::grad_scale_ptr)
      .def_readwrite("found_inf_ptr", &StepArgs::found_inf_ptr);

  // The GIL is released: a step on large tensors should not stall other Python threads.
  m.def("optim_step_cpu", &danlu::optim_step_cpu, py::arg("args"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  py::class_<BatchNormArgs>(m, "BatchNormArgs")
      .def(py::init<>())
      .def_readwrite("dtype", &BatchNormArgs::dtype)
      .def_readwrite("rows", &BatchNormArgs::rows)
      .def_readwrite("channels", &BatchNormArgs::channels)
      .def_readwrite("inner", &BatchNormArgs::inner)
      .def_readwrite("activation", &BatchNormArgs::activation)
      .def_readwrite("act_param", &BatchNormArgs::act_param)
      .def_readwrite("mean", &BatchNormArgs::mean)
      .def_readwrite("invstd", &BatchNormArgs::invstd)
      .def_readwrite("weight", &BatchNormArgs::weight)
      .def_readwrite("bias", &BatchNormArgs::bias)
      .def_readwrite("moments", &BatchNormArgs::moments)
      .def_readwrite("ranks", &BatchNormArgs::ranks)
      .def_readwrite("eps", &BatchNormArgs::eps)
      .def_readwrite("out_mean", &BatchNormArgs::out_mean)
      .def_readwrite("out_invstd", &BatchNormArgs::out_invstd)
      .def_readwrite("out_var", &BatchNormArgs::out_var)
      .def_readwrite("sum_dz", &BatchNormArgs::sum_dz)
      .def_readwrite("sum_dz_xhat", &BatchNormArgs::sum_dz_xhat)
      .def_readwrite("count", &BatchNormArgs::count)
      .def_readwrite("count_ptr", &BatchNormArgs::count_ptr)
      .def_readwrite("batch_stats", &BatchNormArgs::batch_stats)
      .def_readwrite("x", &BatchNormArgs::x)
      .def_readwrite("y", &BatchNormArgs::y)
      .def_readwrite("residual", &BatchNormArgs::residual)
      .def_readwrite("dy", &BatchNormArgs::dy)
      .def_readwrite("dx", &BatchNormArgs::dx)
      .def_readwrite("dresidual", &BatchNormArgs::dresidual);

  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  // The blocking of BatchNorm's reductions (norm/batch_norm_math.h), for tests that model it.
  m.attr("batch_norm_lanes") = danlu::kLanes;
  m.attr("batch_norm_lane_steps") = danlu::kLaneSteps;
  m.def("batch_norm_stats_cpu", &danlu::batch_norm_stats_cpu, py::arg("args"), py::arg("num_threads"), no_gil);
  m.def("batch_norm_finalize_cpu", &danlu::batch_norm_finalize_cpu, py::arg("args"), no_gil);
  m.def("batch_norm_forward_cpu", &danlu::batch_norm_forward_cpu, py::arg("args"), py::arg("num_threads"), no_gil);
  m.def("batch_norm_backward_reduce_cpu", &danlu::batch_norm_backward_reduce_cpu, py::arg("args"),
        py::arg("num_threads"), no_gil);
  m.def("batch_norm_backward_apply_cpu", &danlu::batch_norm_backward_apply_cpu, py::arg("args"), py::arg("num_threads"),
        no_gil);

  m.attr("DROPOUT_MASK_BITS") = danlu::kDropoutMaskBits;
  m.attr("DROPOUT_MAX_BIAS_SIZE") = danlu::kDropoutMaxBiasSize;
  py::class_<DropoutArgs>(m, "DropoutArgs")
      .def(py::init<>())
      .def_readwrite("dtype", &DropoutArgs::dtype)
      .def_readwrite("numel", &DropoutArgs::numel)
      .def_readwrite("x", &DropoutArgs::x)
      .def_readwrite("y", &DropoutArgs::y)
      .def_readwrite("residual", &DropoutArgs::residual)
      .def_readwrite("bias", &DropoutArgs::bias)
      .def_readwrite("bias_size", &DropoutArgs::bias_size)
      .def_readwrite("mask", &DropoutArgs::mask)
      .def_readwrite("seed", &DropoutArgs::seed)
      .def_readwrite("offset", &DropoutArgs::offset)
      .def_readwrite("threshold", &DropoutArgs::threshold)
      .def_readwrite("divisor", &DropoutArgs::divisor);
  m.def("dropout_forward_cpu", &danlu::dropout_forward_cpu, py::arg("args"), py::arg("num_threads"), no_gil);
  m.def("dropout_backward_cpu", &danlu::dropout_backward_cpu, py::arg("args"), py::arg("num_threads"), no_gil);

#ifdef DANLU_WITH_CUDA
  m.def("dropout_forward_cuda", &danlu::dropout_forward_cuda, py::arg("args"), py::arg("device"), py::arg("stream"),
        no_gil);
  m.def("dropout_backward_cuda", &danlu::dropout_backward_cuda, py::arg("args"), py::arg("device"), py::arg("stream"),
        no_gil);
  m.def("batch_norm_cuda_workspace_bytes", &danlu::batch_norm_cuda_workspace_bytes, py::arg("args"));
  m.def("batch_norm_stats_cuda", &danlu::batch_norm_stats_cuda, py::arg("args"), py::arg("device"), py::arg("stream"),
        py::arg("workspace"), no_gil);
  m.def("batch_norm_finalize_cuda", &danlu::batch_norm_finalize_cuda, py::arg("args"), py::arg("device"),
        py::arg("stream"), no_gil);
  m.def("batch_norm_forward_cuda", &danlu::batch_norm_forward_cuda, py::arg("args"), py::arg("device"),
        py::arg("stream"), no_gil);
  m.def("batch_norm_backward_reduce_cuda", &danlu::batch_norm_backward_reduce_cuda, py::arg("args"), py::arg("device"),
        py::arg("stream"), py::arg("workspace"), no_gil);
  m.def("batch_norm_backward_apply_cuda", &danlu::batch_norm_backward_apply_cuda, py::arg("args"), py::arg("device"),
        py::arg("stream"), no_gil);
  m.def("optim_step_cuda", &danlu::optim_step_cuda, py::arg("args"), py::arg("device"), py::arg("stream"),
        py::arg("step_counter"), py::call_guard<py::gil_scoped_release>());
#endif
}
