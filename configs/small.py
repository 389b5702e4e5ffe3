# The CPU quickstart: a small byte-level SqrLLM on the builtin corpus (Python's standard library
# source), memory carried across batches. A few minutes on 2 CPU cores.
#   python train.py configs/small.py && python sample.py --ckpt out/small/ckpt.pt
out_dir = "out/small"
dataset = "builtin"
batching = "stream"
n_layer = 4
n_embd = 128
n_mem = 128
n_ffn = 256
mlp_every = 2
max_timescale = 64.0
batch_size = 16
block_size = 128
max_iters = 1600
learning_rate = 6e-3
min_lr = 6e-4
warmup_iters = 50
eval_interval = 400
eval_max_tokens = 131072
eval_batch_size = 32
eval_streams = 32  # the streamed loss over 32 stretches of 4,096 bytes (one stream costs the CPU's loop 32x the steps)
log_interval = 20
