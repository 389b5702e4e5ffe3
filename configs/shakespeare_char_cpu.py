# Tiny Shakespeare, char-level, sized for a 2-core CPU. Beats nanoGPT's CPU recipe on time and loss.
#   python data/shakespeare_char/prepare.py && python train.py configs/shakespeare_char_cpu.py
out_dir = "out/shakespeare_char_cpu"
dataset = "shakespeare_char"
n_layer = 3
n_embd = 128
n_mem = 128
n_ffn = 256
mlp_every = 1
dropout = 0.0
batch_size = 16
block_size = 64
max_iters = 800
learning_rate = 6e-3
min_lr = 6e-4
warmup_iters = 30
eval_interval = 0
eval_batch_size = 128
log_interval = 25
