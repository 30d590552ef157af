/* finercut-llama-driver: runs a GGUF model in llama.cpp on prompts given as token ids, for tests/test_llama_cpp.py.
 *
 *   finercut-llama-driver MODEL.gguf N_PREDICT LOGITS.f32 < prompts
 *
 * stdin: one prompt per line, its token ids separated by spaces (ids from finercut's tokenizer, so that no
 * tokenizer difference enters the comparison; no BOS is added). For each prompt, in order:
 *   - the logits at the prompt's last position, all n_vocab of them as float32 (native byte order), appended to
 *     LOGITS.f32, so the file holds n_prompts x n_vocab floats;
 *   - the greedy continuation of N_PREDICT tokens (argmax, the lowest id among equal maxima), each token decoded
 *     on top of the previous ones through the KV cache.
 * stdout: one JSON object, {"n_vocab": V, "generated": [[ids of prompt 1], ...]}.
 *
 * One thread, a float32 KV cache and no flash attention: the numbers depend only on the model file. Built against
 * the llama.h of the cached llama.cpp by tools/llama_cpp/build.sh.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

#define MAX_PROMPT 1024

static void quiet(enum ggml_log_level level, const char *text, void *user_data) {
    (void)user_data;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static void fail(const char *message) {
    fprintf(stderr, "finercut-llama-driver: %s\n", message);
    exit(1);
}

static llama_token argmax(const float *logits, int n_vocab) {
    int best = 0;
    for (int i = 1; i < n_vocab; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

/* Decode tokens[0..n) at positions pos0.. in sequence 0, with logits for the last one only. */
static const float *decode(struct llama_context *ctx, struct llama_batch *batch, const llama_token *tokens, int n,
                           int pos0) {
    batch->n_tokens = n;
    for (int i = 0; i < n; i++) {
        batch->token[i] = tokens[i];
        batch->pos[i] = pos0 + i;
        batch->n_seq_id[i] = 1;
        batch->seq_id[i][0] = 0;
        batch->logits[i] = i == n - 1;
    }
    if (llama_decode(ctx, *batch) != 0) fail("llama_decode failed");
    const float *logits = llama_get_logits_ith(ctx, n - 1);
    if (logits == NULL) fail("no logits for the last position");
    return logits;
}

/* One line of space-separated token ids; returns their count, 0 at end of input. */
static int read_prompt(llama_token *tokens) {
    static char line[MAX_PROMPT * 12];
    if (fgets(line, sizeof line, stdin) == NULL) return 0;
    if (strchr(line, '\n') == NULL && !feof(stdin)) fail("prompt line too long");
    int n = 0;
    char *cursor = line, *end;
    for (;;) {
        long id = strtol(cursor, &end, 10);
        if (end == cursor) break;
        if (n == MAX_PROMPT) fail("prompt too long");
        tokens[n++] = (llama_token)id;
        cursor = end;
    }
    while (*cursor == ' ' || *cursor == '\n' || *cursor == '\r') cursor++;
    if (*cursor != '\0') fail("a prompt line holds something other than token ids");
    if (n == 0) fail("empty prompt line");
    return n;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fputs("usage: finercut-llama-driver MODEL.gguf N_PREDICT LOGITS.f32 < prompts (token ids, one line each)\n",
              stderr);
        return 2;
    }
    const int n_predict = atoi(argv[2]);
    if (n_predict < 1) fail("N_PREDICT must be >= 1");

    llama_log_set(quiet, NULL);
    llama_backend_init();

    struct llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(argv[1], model_params);
    if (model == NULL) fail("llama.cpp could not load the model");
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    struct llama_context_params ctx_params = llama_context_default_params();
    ctx_params.n_ctx = MAX_PROMPT + (uint32_t)n_predict;
    ctx_params.n_batch = MAX_PROMPT;
    ctx_params.n_ubatch = MAX_PROMPT;
    ctx_params.n_seq_max = 1;
    ctx_params.n_threads = 1;
    ctx_params.n_threads_batch = 1;
    ctx_params.type_k = GGML_TYPE_F32;
    ctx_params.type_v = GGML_TYPE_F32;
    ctx_params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    ctx_params.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(model, ctx_params);
    if (ctx == NULL) fail("llama.cpp could not create a context");

    FILE *out = fopen(argv[3], "wb");
    if (out == NULL) fail("cannot open the logits file");
    struct llama_batch batch = llama_batch_init(MAX_PROMPT, 0, 1);
    static llama_token tokens[MAX_PROMPT];

    printf("{\"n_vocab\": %d, \"generated\": [", n_vocab);
    int n, prompts = 0;
    while ((n = read_prompt(tokens)) > 0) {
        for (int i = 0; i < n; i++)
            if (tokens[i] < 0 || tokens[i] >= n_vocab) fail("token id out of the vocabulary");
        llama_memory_clear(llama_get_memory(ctx), true);
        const float *logits = decode(ctx, &batch, tokens, n, 0);
        if (fwrite(logits, sizeof(float), (size_t)n_vocab, out) != (size_t)n_vocab) fail("cannot write logits");
        printf("%s[", prompts++ ? ", " : "");
        for (int step = 0; step < n_predict; step++) {
            llama_token next = argmax(logits, n_vocab);
            printf("%s%d", step ? ", " : "", next);
            if (step + 1 < n_predict) logits = decode(ctx, &batch, &next, 1, n + step);
        }
        printf("]");
    }
    printf("]}\n");
    if (fclose(out) != 0) fail("cannot write logits");

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
