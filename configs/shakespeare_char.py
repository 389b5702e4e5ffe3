# Tiny Shakespeare, char-level, sized for one GPU and comparable to nanoGPT's 10.65M-parameter
# baseline (64 x 256 tokens per step). python train.py configs/shakespeare_char.py
out_dir = "out/shakespeare_char"
dataset = "shakespeare_char"
n_layer = 6
n_embd = 384
n_mem = 384
n_ffn = 768
mlp_every = 1
dropout = 0.2
batch_size = 64
block_size = 256
max_iters = 5000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
eval_interval = 250
eval_batch_size = 256
log_interval = 10
