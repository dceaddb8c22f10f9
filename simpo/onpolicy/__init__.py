"""On-policy preference data, as the official SimPO ``on_policy_data_gen/`` made the seed's:
``generate`` (one sampled response per seed and prompt, :mod:`.generate`), ``score`` (a reward
per distinct response, :mod:`.score`), ``binarize`` (best vs worst, :mod:`.binarize`), each
resumable (:mod:`.shards`); the command is :func:`.cli.main` (``simpo-data``)."""
