# Tiny Shakespeare, char-level, sized for a 2-core CPU: beats nanoGPT's CPU recipe (val 1.88 after
# about 100 s) in about 20 s, evaluation included.
#   python data/shakespeare_char/prepare.py && python train.py configs/shakespeare_char_cpu.py
# Random windows of 64 characters, as the windowed evaluation sees them; for the carried-memory
# variant add --batching=stream.
out_dir = "out/shakespeare_char_cpu"
dataset = "shakespeare_char"
batching = "random"
n_layer = 2
n_embd = 96
n_mem = 96
n_ffn = 192
mlp_every = 1
max_timescale = 16.0
dropout = 0.0
batch_size = 16
block_size = 64
max_iters = 600
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 30
eval_interval = 0
eval_batch_size = 128
log_interval = 25
