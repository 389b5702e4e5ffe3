# Tiny Shakespeare, char-level, the one-GPU race (docs/benchmarks.md): val loss (whole val split,
# windows of 256, memory reset) 1.405-1.420 after 32.6-35.3 s on an H200, start-up and the one
# evaluation included; streamed through the whole split (memory carried) 1.381-1.400 over 14 runs.
#   python data/shakespeare_char/prepare.py && python train.py configs/shakespeare_char.py
# The corpus is 1 MB, so regularisation decides: random windows of 256 characters (the windows the
# evaluation sees; carried streams overfit sooner), a narrow memory (n_mem 128) in a deep stack
# (12 sqrll layers, each with its MLP), dropout 0.35, weight decay 2.0, zoneout 0.1 (a memory feature
# keeps its value at a tenth of the steps, drawn at random), and a cosine schedule that
# ends where the val loss stops falling (about 18 epochs); what is evaluated and saved is the
# weights' moving average (ema_decay), about 0.03 lower than the last weights. The step is too
# small to keep a GPU busy from Python, so each one is replayed from a CUDA graph (cuda_graph):
# 2-3x the tokens/s of eager steps. Compiling made steps 1.5x faster again but cost 14 s of start-up.
out_dir = "out/shakespeare_char"
dataset = "shakespeare_char"
batching = "random"
n_layer = 12
n_embd = 384
n_mem = 128
n_ffn = 768
mlp_every = 1
dropout = 0.35
zoneout = 0.1
weight_decay = 2.0
batch_size = 64
block_size = 256
max_iters = 1800
max_time = 43.0
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
compile = False
cuda_graph = True
eval_interval = 0
eval_batch_size = 256
always_save_checkpoint = False
ema_decay = 0.998  # evaluate (and save) the weights' running average: about -0.03 in val loss here
log_interval = 50
