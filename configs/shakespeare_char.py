# Tiny Shakespeare, char-level, the one-GPU race (docs/benchmarks.md): val loss (whole val split,
# windows of 256, memory reset) 1.444-1.453 after 18-21 s on an H200, start-up and the one
# evaluation included.
#   python data/shakespeare_char/prepare.py && python train.py configs/shakespeare_char.py
# The corpus is 1 MB, so regularisation decides: random windows of 256 characters (the windows the
# evaluation sees; carried streams overfit sooner), a narrow memory (n_mem 192 generalises better
# than 128 or 256-768 at equal time), dropout 0.3, weight decay 1.0, and a cosine schedule that ends
# where the val loss stops falling (about 13 epochs); what is evaluated and saved is the weights'
# moving average (ema_decay), about 0.03 lower than the last weights. Eager: at this size the step
# is bound by host-side dispatch, and compiling cost 13 s without making steps faster.
out_dir = "out/shakespeare_char"
dataset = "shakespeare_char"
batching = "random"
n_layer = 6
n_embd = 384
n_mem = 192
n_ffn = 768
mlp_every = 1
dropout = 0.3
weight_decay = 1.0
batch_size = 64
block_size = 256
max_iters = 1300
max_time = 43.0
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
compile = False
eval_interval = 0
eval_batch_size = 256
always_save_checkpoint = False
ema_decay = 0.998  # evaluate (and save) the weights' running average: about -0.03 in val loss here
log_interval = 50
