// The tests' reference run of a GGUF in llama.cpp, written against llama.h alone so that it shares
// no code with uspx's binding: every position's logits of each line of token ids.
//
//   llama-logits MODEL.gguf N_CTX THREADS < ids.txt > logits.f32
//
// stdin: one sequence per line, token ids separated by spaces. stdout: for each sequence, its
// length times the vocabulary's float32 logits, row after row. Settings as uspx evaluates with:
// one batch of the whole context, flash attention on.
#include "llama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf N_CTX THREADS < ids.txt > logits.f32\n", argv[0]);
        return 2;
    }
    const int n_ctx = atoi(argv[2]);
    ggml_backend_load_all();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx;
    cp.n_threads = cp.n_threads_batch = atoi(argv[3]);
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot make a context\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_batch batch = llama_batch_init(n_ctx, 0, 1);

    static char line[1 << 20];
    while (fgets(line, sizeof line, stdin)) {
        batch.n_tokens = 0;
        for (char * tok = strtok(line, " \n"); tok; tok = strtok(NULL, " \n")) {
            if (batch.n_tokens == n_ctx) { fprintf(stderr, "a line is longer than N_CTX\n"); return 1; }
            const int i = batch.n_tokens++;
            batch.token[i] = atoi(tok);
            batch.pos[i] = i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;
        }
        if (batch.n_tokens == 0) continue;
        llama_memory_clear(llama_get_memory(ctx), true);
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }
        for (int i = 0; i < batch.n_tokens; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, stdout);
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
