"""The outer online loops, built on the engine: best-of-N (sample, score, keep, fine-tune) and rounds of
sampling, labelling and training (iterative online KTO / DPO, ReST, ReST-EM, Constitutional AI). Each
training run inside them is an ordinary prospect run; PPO, whose rollouts live inside the training step, is
in prospect/engine/ppo.py."""
