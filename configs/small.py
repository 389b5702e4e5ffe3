# The CPU quickstart: a small byte-level SqrLLM on the builtin corpus (Python's standard library).
# About 4 minutes on 2 CPU cores. python train.py configs/small.py
out_dir = "out/small"
dataset = "builtin"
n_layer = 4
n_embd = 192
n_mem = 192
mlp_every = 2
batch_size = 16
block_size = 128
max_iters = 1500
learning_rate = 4e-3
min_lr = 4e-4
warmup_iters = 50
eval_interval = 500
eval_max_tokens = 65536
dropout = 0.0
