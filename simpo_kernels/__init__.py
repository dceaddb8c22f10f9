"""simpo-kernels: SimPO (Simple Preference Optimization) without materialising logits.

    from simpo_kernels import simpo_loss
    out = simpo_loss(hidden_states, lm_head.weight, labels, beta=10.0, gamma_beta_ratio=0.5,
                     softcap=30.0)
    out.loss.backward()

    # the family (simpo_kernels.losses): DPO against reference sums from the same no-logits path
    ref_c, ref_r = sequence_logps(ref_hidden, ref_lm_head.weight, labels, softcap=30.0)[0].chunk(2)
    out = preference_loss(hidden_states, lm_head.weight, labels, loss="dpo", beta=0.01,
                          ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, softcap=30.0)
"""

from .api import (BACKENDS, preference_loss, preference_loss_from_logits, sequence_logps, simpo_loss,
                  simpo_loss_from_logits)
from .losses import LOSSES, PreferenceLoss
from .objective import PreferenceOutput, SimPOOutput

__all__ = ["BACKENDS", "LOSSES", "PreferenceLoss", "PreferenceOutput", "SimPOOutput", "preference_loss",
           "preference_loss_from_logits", "sequence_logps", "simpo_loss", "simpo_loss_from_logits"]
__version__ = "0.1.0"
