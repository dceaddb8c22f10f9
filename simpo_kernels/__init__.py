"""simpo-kernels: SimPO (Simple Preference Optimization) without materialising logits.

    from simpo_kernels import simpo_loss
    out = simpo_loss(hidden_states, lm_head.weight, labels, beta=10.0, gamma_beta_ratio=0.5,
                     softcap=30.0)
    out.loss.backward()
"""

from .api import BACKENDS, simpo_loss, simpo_loss_from_logits
from .objective import SimPOOutput

__all__ = ["BACKENDS", "SimPOOutput", "simpo_loss", "simpo_loss_from_logits"]
__version__ = "0.1.0"
