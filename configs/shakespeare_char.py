# Tiny Shakespeare, char-level, the one-GPU race: val loss <= 1.46 (windows of 256, memory reset)
# within 45 s of launch, compilation and evaluation included.
#   python data/shakespeare_char/prepare.py && python train.py configs/shakespeare_char.py
# Random windows of 256 characters, as the windowed evaluation sees them; evaluated once, at the end.
out_dir = "out/shakespeare_char"
dataset = "shakespeare_char"
batching = "random"
n_layer = 6
n_embd = 384
n_mem = 384
n_ffn = 768
mlp_every = 1
dropout = 0.2
batch_size = 64
block_size = 256
max_iters = 3000
max_time = 43.0
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
eval_interval = 0
eval_batch_size = 256
always_save_checkpoint = False
log_interval = 50
