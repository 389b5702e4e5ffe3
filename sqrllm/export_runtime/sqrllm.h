/* The C ABI of an exported SqrLLM: one model, one recurrent state, in this process.

   A generation loop:
       sq_reset();
       n = sq_encode(text, strlen(text), ids, max_ids);
       for (i = 0; i < n; i++) sq_feed(ids[i]);
       for (;;) { t = sq_sample(); fwrite(sq_decode(t, &len), 1, len, stdout); sq_feed(t); }

   The recurrent state is float32 and fixed in size: each step costs the same at any position.
   Weights are bfloat16 constants; all arithmetic is float32. */
#ifndef SQRLLM_H
#define SQRLLM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

int sq_vocab_size(void);
int sq_eot_id(void); /* the end-of-text token, where generated text ends (as in sample.py); -1 for none */
const char* sq_model_info(void); /* a JSON object: sizes, tokenizer kind, parameter count */

/* Zero the recurrent state, the logits and the text decoder. */
void sq_reset(void);
/* Run one token through the model; returns the logits for the next token (sq_vocab_size floats),
   valid until the next call that changes the state; NULL (and no step) for an id outside the vocabulary.
   A model trained with reset_at_eot forgets all before an end-of-text token as it feeds one, as in training. */
const float* sq_feed(int token);
const float* sq_logits(void);

/* Sampling from the current logits. temperature 0 = greedy (argmax, lowest id on ties);
   top_k 0 = all tokens; top_p 1 = all tokens. Defaults: 0.8, 200, 1.0, seed 1337. */
void sq_set_temperature(float temperature);
void sq_set_top_k(int top_k);
void sq_set_top_p(float top_p);
void sq_set_seed(uint32_t seed);
int sq_sample(void);

/* Threads for sq_feed: 1 or 2 (each matrix's rows split between two); anything else = automatic:
   2 on a machine with 2 or more cores while that is faster than 1 (see pick_threads in
   sqrllm_runtime.h). The numbers do not depend on it. WebAssembly builds compute on 1 always.
   sq_threads_used: what the last sq_feed ran on (0 before any). */
void sq_set_threads(int n);
int sq_threads_used(void);

/* The state: every sqrll layer's memory, then the current logits; sq_state_size() floats.
   Restoring it resumes generation exactly where it was saved. */
int sq_state_size(void);
void sq_save_state(float* dst);
void sq_restore_state(const float* src);

/* Tokenizer (byte, char or SentencePiece). sq_encode: UTF-8 text -> ids; returns the number of ids,
   of which the first max_ids are written (call again with room for all), or -1 - offset of the
   first byte that a char vocabulary cannot encode (SentencePiece encodes anything). */
int sq_encode(const char* text, int n_bytes, int* ids, int max_ids);
/* The raw bytes of one token (not NUL-terminated). */
const char* sq_token_bytes(int token, int* n_bytes);
/* Streaming text: the token's bytes go through a UTF-8 decoder that holds back incomplete
   sequences and turns invalid ones into U+FFFD, as Python's errors="replace" and the browser's
   TextDecoder do. Returns valid UTF-8 (n_bytes may be 0); token -1 flushes what is held back. */
const char* sq_decode(int token, int* n_bytes);

#ifdef __cplusplus
}
#endif

#endif
