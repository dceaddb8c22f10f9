"""simpo: the Hugging Face training system around :mod:`simpo_kernels`.

``simpo-train`` / ``python -m simpo.train`` run a recipe; the pieces are importable:
:class:`simpo.trainer.SimPOTrainer`, :mod:`simpo.data` (official templating, tokenisation,
truncation and collation), :mod:`simpo.modeling` (the SimPO forward patch and the embedded tiny
Gemma-2 model), :mod:`simpo.config` (arguments and recipe parsing).
"""
