"""Drop-in fused replacements for torch.optim: same arguments, defaults, state_dict and semantics."""

from danlu.optim.adagrad import Adagrad
from danlu.optim.adam import Adam, AdamW
from danlu.optim.rmsprop import RMSprop
from danlu.optim.sgd import SGD

__all__ = ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad"]
