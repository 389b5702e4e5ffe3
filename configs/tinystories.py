# TinyStories (roneneldan/TinyStories): 2.1M short stories, SentencePiece unigram, 4096 pieces,
# each story followed by end-of-text, where the carried memory restarts. About 19M parameters,
# 330M tokens (0.7 epoch) in 20000 steps; sized for one GPU.
#   python data/tinystories/prepare.py && python train.py configs/tinystories.py
#   python sample.py --ckpt out/tinystories/ckpt.pt --prompt "Once upon a time"
out_dir = "out/tinystories"
dataset = "tinystories"
batching = "stream"
reset_at_eot = True
n_layer = 6
n_embd = 512
n_mem = 512
n_ffn = 1024
mlp_every = 1
max_timescale = 256.0  # a story is about 200 tokens
dropout = 0.0
batch_size = 64
block_size = 256
max_iters = 20000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 200
eval_interval = 1000
eval_max_tokens = 1_000_000
eval_batch_size = 64
log_interval = 50
