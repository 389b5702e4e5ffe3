# FineWeb-Edu, the sample-10BT subset (HuggingFaceFW/fineweb-edu): educational web pages,
# SentencePiece unigram with 8192 pieces, memory restarted at each document's end-of-text. About 84M
# parameters, 2B tokens in 30000 steps of 65536 tokens; sized for one large GPU (or torchrun).
#   python data/fineweb_edu/prepare.py && python train.py configs/fineweb_edu.py
out_dir = "out/fineweb_edu"
dataset = "fineweb_edu"
batching = "stream"
reset_at_eot = True
n_layer = 12
n_embd = 768
n_mem = 768
n_ffn = 1536
mlp_every = 1
max_timescale = 1024.0  # documents run to thousands of tokens
dropout = 0.0
batch_size = 32
block_size = 512
gradient_accumulation_steps = 4
max_iters = 30000
learning_rate = 1.5e-3
min_lr = 1.5e-4
warmup_iters = 500
eval_interval = 1000
eval_max_tokens = 1_000_000
eval_batch_size = 32
log_interval = 50
