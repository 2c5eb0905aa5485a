"""Online methods: the policy samples its own completions, a reward model, function or judge scores them,
and the engine trains on the result (PPO, best-of-N, ReST, iterative KTO/DPO)."""
