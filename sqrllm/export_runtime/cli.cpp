// Command-line generation with an exported SqrLLM; the same program runs natively and under Node.js
// (node node_cli.js, the wasm build: stdin and files behave as natively).
//
//   ./sqrllm "def main("                        # sample 500 tokens after the prompt
//   ./sqrllm -n 200 -t 0 "def main("            # greedy: the text sample.py --step native_bf16 --temperature 0
//                                               # prints (the export's weights are bfloat16; plain sample.py
//                                               # runs the checkpoint's float32 weights, so it may differ)
//   echo "def main(" | ./sqrllm -n 100          # no prompt argument: the prompt is read from stdin
//   ./sqrllm -- "- item"                        # after --, a prompt may start with '-'
//
// Prints the prompt, then the generated text as it is produced (up to an end-of-text token), then
// a newline, as sample.py does.
// Speed goes to stderr at the end.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "sqrllm.h"

static const char* USAGE =
    "usage: sqrllm [options] [--] [PROMPT]\n"
    "  PROMPT               text to start from; without it the prompt is read from stdin\n"
    "  --                   end of options: what follows is the prompt, even if it starts with '-'\n"
    "  -n, --tokens N       tokens to generate (default 500)\n"
    "  -t, --temperature T  0 = greedy (default 0.8)\n"
    "  -k, --top-k K        sample among the K most likely tokens; 0 = all (default 200)\n"
    "  -p, --top-p P        sample from the smallest set of tokens with mass >= P (default 1 = off)\n"
    "  -s, --seed S         random seed (default 1337)\n"
    "  --threads N          1 or 2; default: 2 on a machine with 2 or more cores, falling back to 1\n"
    "                       while that is faster (another process is busy); the text is the same\n"
    "  --dump-logits FILE   write to FILE, as float32 rows, the logits each generated token was\n"
    "                       chosen from\n"
    "  -q, --quiet          no speed report on stderr\n";

static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Streams text: flushed every 20 ms at most, which looks live and costs no system call per token.
static void write_text(const char* s, int n, bool flush = false) {
    static double flushed = 0.0;
    if (n > 0) fwrite(s, 1, n, stdout);
    if (flush || now() - flushed > 0.02) {
        fflush(stdout);
        flushed = now();
    }
}

static bool parse_number(const char* flag, const char* text, double lo, double hi, double* out) {
    char* end = nullptr;
    double v = text ? strtod(text, &end) : 0.0;
    if (!text || *text == '\0' || *end != '\0' || !(v >= lo && v <= hi)) {
        fprintf(stderr, "sqrllm: %s needs a number in [%g, %g], got '%s'\n", flag, lo, hi, text ? text : "");
        return false;
    }
    *out = v;
    return true;
}

// Decimal digits only: "1.5", "1e3", "-1" and " 5" are refused rather than read as something else.
static bool parse_integer(const char* flag, const char* text, long long lo, long long hi, long long* out) {
    bool ok = text && *text && strlen(text) <= 18 && strspn(text, "0123456789") == strlen(text);
    long long v = ok ? strtoll(text, nullptr, 10) : 0;
    if (!ok || v < lo || v > hi) {
        fprintf(stderr, "sqrllm: %s needs an integer in [%lld, %lld], got '%s'\n", flag, lo, hi, text ? text : "");
        return false;
    }
    *out = v;
    return true;
}

int main(int argc, char** argv) {
    long long n_new = 500, top_k = 200, seed = 1337, threads = 0;
    double temperature = 0.8, top_p = 1.0;
    const char* dump_path = nullptr;
    const char* prompt_arg = nullptr;
    bool quiet = false, options_done = false;
    for (int a = 1; a < argc; a++) {
        std::string f = argv[a];
        const char* flag = argv[a];
        const char* v = a + 1 < argc ? argv[a + 1] : nullptr;
        bool ok = true;
        if (options_done || f == "-" || f[0] != '-') {
            if (prompt_arg) { fprintf(stderr, "sqrllm: one prompt only; quote it\n%s", USAGE); return 2; }
            prompt_arg = argv[a];
            continue;
        }
        if (f == "--") { options_done = true; continue; }
        else if (f == "-h" || f == "--help") { fputs(USAGE, stdout); return 0; }
        else if (f == "-q" || f == "--quiet") { quiet = true; continue; }
        else if (f == "-n" || f == "--tokens") ok = parse_integer(flag, v, 0, 1000000000, &n_new);
        else if (f == "-t" || f == "--temperature") ok = parse_number(flag, v, 0, 1e6, &temperature);
        else if (f == "-k" || f == "--top-k") ok = parse_integer(flag, v, 0, 1000000000, &top_k);
        else if (f == "-p" || f == "--top-p") ok = parse_number(flag, v, 0, 1, &top_p);
        else if (f == "-s" || f == "--seed") ok = parse_integer(flag, v, 0, 4294967295LL, &seed);
        else if (f == "--threads") ok = parse_integer(flag, v, 1, 2, &threads);
        else if (f == "--dump-logits") { if (!(ok = v != nullptr)) fputs("sqrllm: --dump-logits needs a file\n", stderr); else dump_path = v; }
        else {
            fprintf(stderr, "sqrllm: unknown option '%s' (a prompt that starts with '-' goes after --)\n%s", flag, USAGE);
            return 2;
        }
        if (!ok) return 2;
        a++;  // the option's value
    }

    std::string prompt;
    if (prompt_arg) {
        prompt = prompt_arg;
    } else {
        char buf[4096];
        size_t got;
        while ((got = fread(buf, 1, sizeof buf, stdin)) > 0) prompt.append(buf, got);
    }
    std::vector<int> ids(prompt.size() + 1);
    int n_ids = sq_encode(prompt.data(), (int)prompt.size(), ids.data(), (int)ids.size());
    if (n_ids > (int)ids.size()) {
        ids.resize(n_ids);
        sq_encode(prompt.data(), (int)prompt.size(), ids.data(), n_ids);
    }
    if (n_ids < 0) {
        fprintf(stderr, "sqrllm: the prompt has a character outside this model's vocabulary at byte %d\n", -1 - n_ids);
        return 1;
    }
    if (n_ids == 0) {
        fputs("sqrllm: the prompt is empty; give at least one character\n", stderr);
        return 1;
    }
    FILE* dump = nullptr;
    if (dump_path && !(dump = fopen(dump_path, "wb"))) {
        fprintf(stderr, "sqrllm: cannot write %s\n", dump_path);
        return 1;
    }

    sq_set_temperature((float)temperature);
    sq_set_top_k((int)top_k);
    sq_set_top_p((float)top_p);
    sq_set_seed((uint32_t)seed);
    sq_set_threads((int)threads);
    sq_reset();
    write_text(prompt.data(), (int)prompt.size());

    const int V = sq_vocab_size();
    double t0 = now();
    const float* logits = nullptr;
    for (int i = 0; i < n_ids; i++) logits = sq_feed(ids[i]);
    double t1 = now();
    const long long n_gen = n_new;
    const int eot = sq_eot_id();
    long long i = 0, on_two = 0;
    for (; i < n_gen; i++) {
        if (dump) fwrite(logits, sizeof(float), V, dump);
        int token = sq_sample();
        if (token == eot) break;  // the text ends here, as in sample.py
        int n;
        const char* text = sq_decode(token, &n);
        write_text(text, n);
        logits = sq_feed(token);
        on_two += sq_threads_used() == 2;
    }
    double t2 = now();
    int n;
    const char* tail = sq_decode(-1, &n);
    write_text(tail, n);
    write_text("\n", 1, true);
    if (dump && (ferror(dump) | (fclose(dump) != 0))) {  // fclose writes what is still buffered
        fprintf(stderr, "sqrllm: cannot write %s\n", dump_path);
        return 1;
    }
    if (ferror(stdout)) {  // a full disk or a closed pipe: the text is incomplete
        fprintf(stderr, "sqrllm: cannot write the text to standard output\n");
        return 1;
    }
    if (!quiet) {
        char threads_note[64];
        if (on_two == 0 || on_two == i) snprintf(threads_note, sizeof threads_note, "on %d thread%s", on_two ? 2 : 1, on_two ? "s" : "");
        else snprintf(threads_note, sizeof threads_note, "on 2 threads for %.0f%% of them", 100.0 * on_two / i);
        fprintf(stderr, "sqrllm: prompt %d tokens in %.4f s (%.1f tokens/s), generated %lld tokens in %.4f s (%.1f tokens/s) %s\n",
                n_ids, t1 - t0, n_ids / (t1 - t0), i, t2 - t1, i > 0 ? i / (t2 - t1) : 0.0, threads_note);
    }
    return 0;
}
