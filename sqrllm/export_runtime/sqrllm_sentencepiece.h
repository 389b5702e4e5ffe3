// SentencePiece encoding in plain C++, from the tables sqrllm.export reads out of a .model file.
//
// Follows the reference implementation step by step, so that ids match the sentencepiece package
// (and sqrllm's SentencePieceTokenizer, which sets U+2581 apart, see encode):
// 1. normalize: the precompiled character map (longest match in its double-array trie), then
//    whitespace rules (drop leading, trailing and repeated spaces; a dummy prefix space; spaces
//    written as U+2581);
// 2. segment: unigram (Viterbi over all pieces, an unknown node where no one-character piece fits)
//    or BPE (merge the best-scoring adjacent pair, leftmost first, until none is a piece);
// 3. unknown pieces become their UTF-8 bytes as byte pieces (byte fallback), or one <unk> per run.
// Decoding needs no code here: each token's bytes are in the model's token table.
#ifndef SQRLLM_SENTENCEPIECE_H
#define SQRLLM_SENTENCEPIECE_H

#include <cstdint>
#include <cstring>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

namespace sq {

enum PieceType { SP_NORMAL = 1, SP_UNKNOWN = 2, SP_CONTROL = 3, SP_USER_DEFINED = 4, SP_UNUSED = 5, SP_BYTE = 6 };
enum SpModelType { SP_UNIGRAM = 1, SP_BPE = 2 };

struct SentencePieceSpec {
    int model_type;            // SP_UNIGRAM or SP_BPE
    const char* pieces;        // every piece as written in the model (U+2581 for spaces), concatenated
    const int* piece_offsets;  // piece i is pieces[piece_offsets[i] .. piece_offsets[i + 1])
    const float* scores;
    const unsigned char* types;  // PieceType per id
    int unk_id;
    bool byte_fallback, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces;
    const unsigned char* charsmap;  // precompiled_charsmap, or nullptr: no character normalization
    int charsmap_size;
};

// Bytes in the UTF-8 character that starts with b, judged by b alone (as sentencepiece does).
static inline int sp_char_len(unsigned char b) { return b < 0xC0 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4; }

// Length of the well-formed UTF-8 character at s (at most n bytes), or 0 if it is malformed.
static inline int sp_valid_char(const unsigned char* s, int n) {
    const unsigned char b = s[0];
    if (b < 0x80) return 1;
    int len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) len = 2;
    else if (b == 0xE0) len = 3, lo = 0xA0;
    else if (b == 0xED) len = 3, hi = 0x9F;
    else if (b >= 0xE1 && b <= 0xEF) len = 3;
    else if (b == 0xF0) len = 4, lo = 0x90;
    else if (b >= 0xF1 && b <= 0xF3) len = 4;
    else if (b == 0xF4) len = 4, hi = 0x8F;
    else return 0;
    if (n < len || s[1] < lo || s[1] > hi) return 0;
    for (int i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return len;
}

class SentencePiece {
  public:
    void init(const SentencePieceSpec* spec, int vocab_size) {
        S = spec;
        min_score = 0.0f;
        bool first = true;
        for (int i = 0; i < vocab_size; i++) {
            const int t = S->types[i];
            std::string piece(S->pieces + S->piece_offsets[i], S->piece_offsets[i + 1] - S->piece_offsets[i]);
            if (t == SP_NORMAL || t == SP_USER_DEFINED || t == SP_UNUSED) {
                ids.emplace(piece, i);
                int chars = 0;
                for (size_t p = 0; p < piece.size(); p += sp_char_len((unsigned char)piece[p])) chars++;
                max_chars = std::max(max_chars, chars);
            }
            if (t == SP_NORMAL) min_score = first ? S->scores[i] : std::min(min_score, S->scores[i]), first = false;
            if (t == SP_BYTE && piece.size() == 6) byte_ids[std::stoi(piece.substr(3, 2), nullptr, 16)] = i;
        }
        if (S->charsmap) {
            uint32_t trie_bytes;
            std::memcpy(&trie_bytes, S->charsmap, 4);
            trie = S->charsmap + 4;
            trie_units = trie_bytes / 4;
            normalized = (const char*)trie + trie_bytes;
        }
    }

    // UTF-8 text -> ids, appended to out, as sqrllm's SentencePieceTokenizer: with byte fallback,
    // text holding U+2581 (which SentencePiece cannot tell from an escaped space) is encoded in
    // parts around it, the character itself as its three byte tokens, so that it round-trips.
    void encode(const char* text, int len, std::vector<int>& out) const {
        static const char SPACE[] = "\xE2\x96\x81";
        const std::string t(text, len);
        size_t at = S->byte_fallback ? t.find(SPACE) : std::string::npos;
        if (at == std::string::npos) return encode_part(text, len, out);
        size_t from = 0;
        for (; at != std::string::npos; from = at + 3, at = t.find(SPACE, from)) {
            if (at > from) encode_part(text + from, (int)(at - from), out);
            for (int k = 0; k < 3; k++) out.push_back(byte_ids[(unsigned char)SPACE[k]]);
        }
        if (from < t.size()) encode_part(text + from, (int)(t.size() - from), out);
    }

  private:
    void encode_part(const char* text, int len, std::vector<int>& out) const {
        const std::string s = normalize(text, len);
        std::vector<std::pair<std::string, int>> pieces;
        if (S->model_type == SP_BPE) bpe(s, pieces);
        else unigram(s, pieces);
        bool prev_unk = false;
        for (const auto& p : pieces) {
            const bool unk = p.second == S->unk_id;
            if (unk && S->byte_fallback) {
                for (unsigned char b : p.first) out.push_back(byte_ids[b]);
            } else if (!(unk && prev_unk)) {  // a run of unknown pieces is one <unk>
                out.push_back(p.second);
            }
            prev_unk = unk;
        }
    }

    const SentencePieceSpec* S = nullptr;
    std::unordered_map<std::string, int> ids;  // normal, user-defined and unused pieces
    int byte_ids[256] = {0};
    int max_chars = 1;
    float min_score = 0.0f;
    const unsigned char* trie = nullptr;  // darts-clone double array of the character map
    uint32_t trie_units = 0;
    const char* normalized = nullptr;     // NUL-terminated replacement strings

    uint32_t unit(uint32_t i) const {
        uint32_t u = 0;
        if (i < trie_units) std::memcpy(&u, trie + 4 * (size_t)i, 4);
        return u;
    }

    // The character map's longest rule that is a prefix of s: its length in bytes (0 if none),
    // and the replacement in *out.
    int longest_rule(const unsigned char* s, int n, const char** out) const {
        // darts-clone unit: bit 8 has_leaf, bits 0-7 label (bit 31 marks a value), offset in bits 10+
        auto offset = [](uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); };
        int best = 0;
        uint32_t id = offset(unit(0));
        for (int i = 0; i < n; i++) {
            id ^= s[i];
            const uint32_t u = unit(id);
            if ((u & ((1u << 31) | 0xFF)) != s[i]) break;
            id ^= offset(u);
            if ((u >> 8) & 1) {
                best = i + 1;
                *out = normalized + (unit(id) & 0x7FFFFFFFu);
            }
        }
        return best;
    }

    // One step of normalization: (replacement text, bytes of input consumed).
    std::pair<std::string, int> normalize_prefix(const char* s, int n) const {
        const unsigned char* u = (const unsigned char*)s;
        if (trie) {
            const char* rule = nullptr;
            const int len = longest_rule(u, n, &rule);
            if (len > 0) return {std::string(rule), len};
        }
        const int len = sp_valid_char(u, n);
        if (len == 0) return {"\xEF\xBF\xBD", 1};  // a malformed byte becomes U+FFFD
        return {std::string(s, len), len};
    }

    std::string normalize(const char* s, int n) const {
        static const std::string SPACE = "\xE2\x96\x81";
        const std::string ws = S->escape_whitespaces ? SPACE : " ";
        std::string out;
        int pos = 0;
        if (S->remove_extra_whitespaces) {
            while (pos < n) {
                auto p = normalize_prefix(s + pos, n - pos);
                if (p.first != " ") break;
                pos += p.second;
            }
        }
        if (pos == n) return out;
        if (S->add_dummy_prefix) out += ws;
        bool prev_space = S->remove_extra_whitespaces;
        while (pos < n) {
            auto p = normalize_prefix(s + pos, n - pos);
            size_t k = 0;
            while (prev_space && k < p.first.size() && p.first[k] == ' ') k++;
            if (k < p.first.size()) {
                for (; k < p.first.size(); k++) {
                    if (p.first[k] == ' ') out += ws;
                    else out += p.first[k];
                }
                prev_space = p.first.back() == ' ';
            }
            pos += p.second;
            if (!S->remove_extra_whitespaces) prev_space = false;
        }
        if (S->remove_extra_whitespaces)
            while (out.size() >= ws.size() && out.compare(out.size() - ws.size(), ws.size(), ws) == 0)
                out.resize(out.size() - ws.size());
        return out;
    }

    int lookup(const std::string& piece) const {
        auto it = ids.find(piece);
        return it == ids.end() ? -1 : it->second;
    }

    // Viterbi over characters. best[e]: score of the best path to char e; the first candidate to
    // reach it wins ties, candidates arriving in the reference's order (begin, then length).
    void unigram(const std::string& s, std::vector<std::pair<std::string, int>>& out) const {
        std::vector<int> at;  // byte offset of each character, then the end
        for (size_t p = 0; p < s.size(); p += sp_char_len((unsigned char)s[p])) at.push_back((int)p);
        const int n = (int)at.size();
        at.push_back((int)s.size());
        std::vector<float> best(n + 1, 0.0f);
        std::vector<int> from(n + 1, -1), id(n + 1, -1);
        const float unk_score = min_score - 10.0f;
        for (int b = 0; b < n; b++) {
            bool has_single = false;
            for (int k = 1; k <= max_chars && b + k <= n; k++) {
                const int i = lookup(s.substr(at[b], at[b + k] - at[b]));
                if (i < 0 || S->types[i] == SP_UNUSED) continue;
                has_single |= k == 1;
                relax(best, from, id, b, b + k, i, S->scores[i]);
            }
            if (!has_single) relax(best, from, id, b, b + 1, S->unk_id, unk_score);
        }
        std::vector<std::pair<std::string, int>> rev;
        for (int e = n; e > 0; e = from[e]) rev.emplace_back(s.substr(at[from[e]], at[e] - at[from[e]]), id[e]);
        out.assign(rev.rbegin(), rev.rend());
    }

    static void relax(std::vector<float>& best, std::vector<int>& from, std::vector<int>& id, int b, int e, int i,
                      float score) {
        const float total = best[b] + score;
        if (from[e] < 0 || total > best[e]) best[e] = total, from[e] = b, id[e] = i;
    }

    void bpe(const std::string& s, std::vector<std::pair<std::string, int>>& out) const {
        struct Symbol { int prev, next, begin, len; };
        struct Pair {
            float score;
            int left, right, len;
            bool operator<(const Pair& o) const {  // the queue pops the best score, then the leftmost
                return score < o.score || (score == o.score && left > o.left);
            }
        };
        std::vector<Symbol> sym;
        for (int p = 0; p < (int)s.size();) {
            const int len = std::min(sp_char_len((unsigned char)s[p]), (int)s.size() - p);
            sym.push_back({(int)sym.size() - 1, (int)sym.size() + 1, p, len});
            p += len;
        }
        if (sym.empty()) return;
        sym.back().next = -1;
        std::priority_queue<Pair> agenda;
        auto consider = [&](int l, int r) {
            if (l < 0 || r < 0) return;
            const int i = lookup(s.substr(sym[l].begin, sym[l].len + sym[r].len));
            if (i >= 0) agenda.push({S->scores[i], l, r, sym[l].len + sym[r].len});
        };
        for (int i = 1; i < (int)sym.size(); i++) consider(i - 1, i);
        while (!agenda.empty()) {
            const Pair top = agenda.top();
            agenda.pop();
            Symbol &l = sym[top.left], &r = sym[top.right];
            if (l.len == 0 || r.len == 0 || l.len + r.len != top.len) continue;  // outdated
            l.len += r.len;
            l.next = r.next;
            if (r.next >= 0) sym[r.next].prev = top.left;
            r.len = 0;
            consider(l.prev, top.left);
            consider(top.left, l.next);
        }
        for (int i = 0; i >= 0; i = sym[i].next) {
            std::string piece = s.substr(sym[i].begin, sym[i].len);
            const int id = lookup(piece);
            out.emplace_back(piece, id < 0 ? S->unk_id : id);
        }
    }
};

}  // namespace sq

#endif
