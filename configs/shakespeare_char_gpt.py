# The GPT baseline on Tiny Shakespeare, char-level: nanoGPT's shakespeare_char recipe (6 layers,
# 6 heads, width 384, block 256, batch 64, dropout 0.2, lr 1e-3, 5000 iterations; its README reports
# a best val loss of 1.4697) in this harness: the same data, evaluation, optimizer and loop as sqrllm.
#   python data/shakespeare_char/prepare.py && python train.py configs/shakespeare_char_gpt.py
out_dir = "out/shakespeare_char_gpt"
dataset = "shakespeare_char"
model = "gpt"
batching = "random"
n_layer = 6
n_head = 6
n_embd = 384
n_ffn = 1024  # the gated MLP's 3 x 384 x 1024 weights: as many as nanoGPT's 4x GELU MLP
dropout = 0.2
bias = False
batch_size = 64
block_size = 256
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.1
beta2 = 0.99
eval_interval = 250
eval_batch_size = 256
always_save_checkpoint = False
log_interval = 50
cuda_graph = True  # as sqrllm's config: each step replayed from a CUDA graph
