/* A test double of librkllmrt 1.3.0, built from this project's own declarations (rkllm_abi.h).
 *
 * The tests compile it with `gcc -shared -fPIC` and point RKLLM_LIB at it. It checks what the
 * binding hands it and drives the result callback the way the runtime does.
 *
 * Selected at rkllm_init by environment variables:
 *   FAKE_RKLLM_SCENARIO  stream (default) | utf8 | utf8_resend | error_state | run_fail | slow |
 *                        init_fail | init_null | destroy_fail, or one of the runtime misbehaviours
 *                        the binding guards against:
 *                        adds_template  wraps EMBED input in a chat template (TEMPLATE_TOKENS more
 *                                       prefilled and cached) until rkllm_set_chat_template("", "", "")
 *                        template_fail  the same, and rkllm_set_chat_template returns -1
 *                        miscount       perf.prefill_tokens is one more than the rows fed
 *                        loses_cache    ignores keep_history: the KV cache is empty after every run
 *                        eos            streams the EOS id (FAKE_RKLLM_EOS, default 2) as its second
 *                                       token and keeps going (20 ms per token) up to max_new_tokens
 *                        With FAKE_RKLLM_EOS set, the scripted scenarios (stream, ...) end their stream with
 *                        that id, as a runtime that passes its end-of-turn token to the callback.
 *   FAKE_RKLLM_TOKEN_BASE  first token id of the slow and eos scenarios (default 1000; they count up)
 *   FAKE_RKLLM_HIDDEN    embedding width used for the CRC-32 of the EMBED input (float32 rows)
 *   FAKE_RKLLM_REPORT    file the double rewrites as JSON after every call: counters, the init
 *                        parameters (and RKLLM_LOG_LEVEL as set at init), every run's input as
 *                        received, every rkllm_set_chat_template call
 * A new report path resets the counters, so each test sees only its own calls.
 *
 * Build variants used by the loader tests:
 *   -DFAKE_ABI_1_2        rkllm_createDefaultParam returns the 208-byte 1.2.1-1.2.3 layout
 *   -DFAKE_BEFORE_1_2_1   the functions added in 1.2.1 are not exported
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef FAKE_ABI_1_2 /* this variant exports its own, older rkllm_createDefaultParam below */
#define rkllm_createDefaultParam rkllm_createDefaultParam_v1_3
#endif
#include "rkllm_abi.h"
#undef rkllm_createDefaultParam

#define EXPORT __attribute__((visibility("default")))
#define MAX_HANDLES 16
#define FAKE_MAGIC 0x524b4c4du

typedef struct {
    uint32_t magic;
    char scenario[32];
    int hidden;
    int max_context_len;
    int max_new_tokens;
    RKLLMCallback cb;
    int abort_flag; /* written by rkllm_abort from another thread: __atomic builtins */
    int running;
    int kv_size;
    int template_tokens; /* what this runtime adds around EMBED input (adds_template, template_fail) */
    int eos_id;
    int stream_eos; /* FAKE_RKLLM_EOS was set: scripted streams end with it */
    int token_base;
} FakeHandle;

#define TEMPLATE_TOKENS 6

/* A growable string for the JSON pieces. */
typedef struct {
    char *s;
    size_t n, cap;
} Buf;

static void buf_printf(Buf *b, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        size_t room = b->cap - b->n;
        va_start(ap, fmt);
        int k = b->s ? vsnprintf(b->s + b->n, room, fmt, ap) : -1;
        va_end(ap);
        if (k >= 0 && (size_t)k < room) {
            b->n += (size_t)k;
            return;
        }
        b->cap = b->cap ? 2 * b->cap + (size_t)(k > 0 ? k : 0) : 1024;
        b->s = realloc(b->s, b->cap);
    }
}

static void buf_json_str(Buf *b, const char *s) {
    if (!s) {
        buf_printf(b, "null");
        return;
    }
    buf_printf(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            buf_printf(b, "\\%c", c);
        else if (c < 0x20)
            buf_printf(b, "\\u%04x", c);
        else
            buf_printf(b, "%c", c);
    }
    buf_printf(b, "\"");
}

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    char report_path[1024];
    int inits, destroys, bad_handle_calls, aborts, clears, is_running_calls, other_calls;
    FakeHandle *live[MAX_HANDLES];
    Buf init;      /* JSON object: the RKLLMParam of the last rkllm_init */
    Buf runs;      /* JSON array items, one per rkllm_run */
    Buf errors;    /* JSON array items: what the double refused */
    Buf cb_returns; /* JSON array items: every value the result callback returned */
    Buf templates;  /* JSON array items: every rkllm_set_chat_template call */
} g;

static void reset_state_locked(const char *path) {
    free(g.init.s);
    free(g.runs.s);
    free(g.errors.s);
    free(g.cb_returns.s);
    free(g.templates.s);
    memset(&g, 0, sizeof g);
    snprintf(g.report_path, sizeof g.report_path, "%s", path);
}

static void write_report_locked(void) {
    if (!g.report_path[0]) return;
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp", g.report_path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    int live = 0;
    for (int i = 0; i < MAX_HANDLES; i++) live += g.live[i] != NULL;
    fprintf(f,
            "{\"inits\": %d, \"destroys\": %d, \"live_handles\": %d, \"bad_handle_calls\": %d, \"aborts\": %d, "
            "\"clears\": %d, \"is_running_calls\": %d, \"other_calls\": %d,\n",
            g.inits, g.destroys, live, g.bad_handle_calls, g.aborts, g.clears, g.is_running_calls, g.other_calls);
    fprintf(f, " \"init\": %s,\n", g.init.s ? g.init.s : "null");
    fprintf(f, " \"runs\": [%s],\n", g.runs.s ? g.runs.s : "");
    fprintf(f, " \"errors\": [%s],\n", g.errors.s ? g.errors.s : "");
    fprintf(f, " \"templates\": [%s],\n", g.templates.s ? g.templates.s : "");
    fprintf(f, " \"callback_returns\": [%s]}\n", g.cb_returns.s ? g.cb_returns.s : "");
    fclose(f);
    rename(tmp, g.report_path);
}

static void error_locked(const char *fn, const char *what) {
    if (g.errors.n) buf_printf(&g.errors, ", ");
    buf_printf(&g.errors, "{\"function\": \"%s\", \"error\": ", fn);
    buf_json_str(&g.errors, what);
    buf_printf(&g.errors, "}");
}

/* The live handle, or NULL (counted) if the binding passed anything else, e.g. a destroyed one. */
static FakeHandle *lookup_locked(LLMHandle handle, const char *fn) {
    for (int i = 0; i < MAX_HANDLES; i++)
        if (g.live[i] && g.live[i] == handle) return g.live[i];
    g.bad_handle_calls++;
    error_locked(fn, "not a live handle");
    write_report_locked();
    return NULL;
}

/* CRC-32 (IEEE 802.3, as zlib.crc32) of the embedding bytes: proves every float arrived intact. */
static uint32_t crc32_bytes(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

#ifdef FAKE_ABI_1_2
/* The 1.2.1-1.2.3 RKLLMParam: three image-tag pointers sit before extend_param. */
typedef struct {
    const char *model_path;
    int32_t max_context_len, max_new_tokens, top_k, n_keep;
    float top_p, temperature, repeat_penalty, frequency_penalty, presence_penalty;
    int32_t mirostat;
    float mirostat_tau, mirostat_eta;
    bool skip_special_token, is_async;
    const char *img_start, *img_end, *img_content;
    RKLLMExtendParam extend_param;
} RKLLMParamV12;
_Static_assert(sizeof(RKLLMParamV12) == 208, "1.2.x RKLLMParam is 208 bytes on LP64");
_Static_assert(offsetof(RKLLMParamV12, extend_param.n_batch) == 100, "1.2.x n_batch offset");

EXPORT RKLLMParamV12 rkllm_createDefaultParam(void) {
    RKLLMParamV12 p;
    memset(&p, 0, sizeof p);
    p.max_context_len = 512;
    p.max_new_tokens = 512;
    p.top_k = 40;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.extend_param.enabled_cpus_num = 4;
    p.extend_param.n_batch = 1;
    return p;
}
#else
EXPORT RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.max_context_len = 512;
    p.max_new_tokens = 512;
    p.top_k = 40;
    p.n_keep = -1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.extend_param.enabled_cpus_num = 4;
    p.extend_param.n_batch = 1;
    return p;
}
#endif

EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback) {
    const char *report = getenv("FAKE_RKLLM_REPORT");
    const char *scenario = getenv("FAKE_RKLLM_SCENARIO");
    const char *hidden = getenv("FAKE_RKLLM_HIDDEN");
    if (!scenario) scenario = "stream";
    pthread_mutex_lock(&g_mu);
    if (report && strcmp(report, g.report_path) != 0) reset_state_locked(report);
    g.inits++;
    int rc = 0;
    if (!handle || !param || !callback || !callback->result_callback) {
        error_locked("rkllm_init", "NULL handle, param, callback or result_callback");
        rc = -1;
        goto out;
    }
    const RKLLMExtendParam *e = &param->extend_param;
    int reserved_clean = 1;
    for (int i = 0; i < 104; i++) reserved_clean &= e->reserved[i] == 0;
    g.init.n = 0;
    buf_printf(&g.init, "{\"model_path\": ");
    buf_json_str(&g.init, param->model_path);
    buf_printf(&g.init,
               ", \"max_context_len\": %d, \"max_new_tokens\": %d, \"top_k\": %d, \"n_keep\": %d, "
               "\"top_p\": %.6g, \"temperature\": %.6g, \"repeat_penalty\": %.6g, \"frequency_penalty\": %.6g, "
               "\"presence_penalty\": %.6g, \"mirostat\": %d, \"mirostat_tau\": %.6g, \"mirostat_eta\": %.6g, "
               "\"skip_special_token\": %d, \"ignore_eos_token\": %d, \"is_async\": %d, "
               "\"base_domain_id\": %d, \"embed_flash\": %d, \"enabled_cpus_num\": %d, \"enabled_cpus_mask\": %u, "
               "\"n_batch\": %d, \"use_cross_attn\": %d, \"reserved_zero\": %d, \"has_tokenizer_callback\": %d, "
               "\"has_embed_callback\": %d, \"log_level\": ",
               param->max_context_len, param->max_new_tokens, param->top_k, param->n_keep, param->top_p,
               param->temperature, param->repeat_penalty, param->frequency_penalty, param->presence_penalty,
               param->mirostat, param->mirostat_tau, param->mirostat_eta, param->skip_special_token,
               param->ignore_eos_token, param->is_async, e->base_domain_id, e->embed_flash, e->enabled_cpus_num,
               e->enabled_cpus_mask, e->n_batch, e->use_cross_attn, reserved_clean,
               callback->tokenizer_callback != NULL, callback->embed_callback != NULL);
    buf_json_str(&g.init, getenv("RKLLM_LOG_LEVEL"));
    buf_printf(&g.init, "}");
    FILE *model = param->model_path ? fopen(param->model_path, "rb") : NULL;
    if (!model) {
        error_locked("rkllm_init", "cannot open model_path");
        rc = -1;
        goto out;
    }
    fclose(model);
    if (strcmp(scenario, "init_fail") == 0) {
        rc = -1;
        goto out;
    }
    if (strcmp(scenario, "init_null") == 0) {
        *handle = NULL;
        goto out;
    }
    int slot = -1;
    for (int i = 0; i < MAX_HANDLES && slot < 0; i++)
        if (!g.live[i]) slot = i;
    if (slot < 0) {
        error_locked("rkllm_init", "too many live handles");
        rc = -1;
        goto out;
    }
    FakeHandle *h = calloc(1, sizeof *h);
    h->magic = FAKE_MAGIC;
    snprintf(h->scenario, sizeof h->scenario, "%s", scenario);
    h->hidden = hidden ? atoi(hidden) : 0;
    h->max_context_len = param->max_context_len;
    h->max_new_tokens = param->max_new_tokens;
    h->cb = *callback;
    h->template_tokens = strcmp(scenario, "adds_template") == 0 || strcmp(scenario, "template_fail") == 0
                             ? TEMPLATE_TOKENS : 0;
    const char *eos = getenv("FAKE_RKLLM_EOS");
    h->eos_id = eos ? atoi(eos) : 2;
    h->stream_eos = eos != NULL;
    const char *base = getenv("FAKE_RKLLM_TOKEN_BASE");
    h->token_base = base ? atoi(base) : 1000;
    g.live[slot] = h;
    *handle = h;
out:
    write_report_locked();
    pthread_mutex_unlock(&g_mu);
    return rc;
}

EXPORT int rkllm_destroy(LLMHandle handle) {
    pthread_mutex_lock(&g_mu);
    int rc = -1, found = 0;
    for (int i = 0; i < MAX_HANDLES && !found; i++) {
        if (g.live[i] && g.live[i] == handle) {
            FakeHandle *h = g.live[i];
            found = 1;
            g.live[i] = NULL;
            g.destroys++;
            rc = strcmp(h->scenario, "destroy_fail") == 0 ? -1 : 0;
            h->magic = 0;
            free(h);
        }
    }
    if (!found) {
        g.bad_handle_calls++;
        error_locked("rkllm_destroy", "not a live handle");
    }
    write_report_locked();
    pthread_mutex_unlock(&g_mu);
    return rc;
}

typedef struct {
    const char *text;
    int32_t token_id;
    int state;
} Token;

static const Token STREAM[] = {{"Hello", 100, RKLLM_RUN_NORMAL}, {" world", 101, RKLLM_RUN_NORMAL}, {"!", 102, RKLLM_RUN_NORMAL}};
/* "café 中": é (C3 A9) and 中 (E4 B8 AD) each split across a WAITING and a NORMAL callback. */
static const Token UTF8[] = {{"caf", 200, RKLLM_RUN_NORMAL},
                             {"\xc3", 201, RKLLM_RUN_WAITING},
                             {"\xa9", 202, RKLLM_RUN_NORMAL},
                             {" \xe4\xb8", 203, RKLLM_RUN_WAITING},
                             {"\xad", 204, RKLLM_RUN_NORMAL}};
/* The other reading of WAITING: the partial bytes first, then the whole character again. */
static const Token UTF8_RESEND[] = {{"caf", 200, RKLLM_RUN_NORMAL}, {"\xc3", 201, RKLLM_RUN_WAITING}, {"\xc3\xa9", 202, RKLLM_RUN_NORMAL}};

static int emit(FakeHandle *h, void *userdata, const char *text, int32_t token_id, int state) {
    RKLLMResult r;
    memset(&r, 0, sizeof r);
    r.text = text;
    r.token_id = token_id;
    int ret = h->cb.result_callback(&r, userdata, state);
    pthread_mutex_lock(&g_mu);
    buf_printf(&g.cb_returns, "%s%d", g.cb_returns.n ? ", " : "", ret);
    pthread_mutex_unlock(&g_mu);
    return ret;
}

static void finish(FakeHandle *h, void *userdata, int prefill_tokens, int generated) {
    RKLLMResult r;
    memset(&r, 0, sizeof r);
    r.token_id = -1;
    r.perf.prefill_time_ms = 12.5f;
    r.perf.prefill_tokens = prefill_tokens;
    r.perf.generate_time_ms = 4.0f * (float)generated;
    r.perf.generate_tokens = generated;
    r.perf.memory_usage_mb = 321.5f;
    int ret = h->cb.result_callback(&r, userdata, RKLLM_RUN_FINISH);
    pthread_mutex_lock(&g_mu);
    buf_printf(&g.cb_returns, "%s%d", g.cb_returns.n ? ", " : "", ret);
    pthread_mutex_unlock(&g_mu);
}

static int run(LLMHandle handle, RKLLMInput *in, RKLLMInferParam *ip, void *userdata, const char *fn) {
    pthread_mutex_lock(&g_mu);
    FakeHandle *h = lookup_locked(handle, fn);
    if (!h) {
        pthread_mutex_unlock(&g_mu);
        return -1;
    }
    if (!in || !ip) {
        error_locked(fn, "NULL input or infer params");
        write_report_locked();
        pthread_mutex_unlock(&g_mu);
        return -1;
    }
    size_t n_tokens = in->input_type == RKLLM_INPUT_EMBED ? in->embed_input.n_tokens : 0;
    int crc_known = in->input_type == RKLLM_INPUT_EMBED && in->embed_input.embed && h->hidden > 0;
    uint32_t crc = crc_known ? crc32_bytes((const unsigned char *)in->embed_input.embed,
                                           n_tokens * (size_t)h->hidden * sizeof(float))
                             : 0;
    const RKLLMSamplingParam *sp = ip->sampling_params;
    if (g.runs.n) buf_printf(&g.runs, ", ");
    buf_printf(&g.runs, "{\"function\": \"%s\", \"input_type\": %d, \"role\": ", fn, in->input_type);
    buf_json_str(&g.runs, in->role);
    buf_printf(&g.runs,
               ", \"enable_thinking\": %d, \"n_tokens\": %zu, \"crc32\": %u, \"mode\": %d, \"keep_history\": %d, "
               "\"max_new_tokens\": %d, \"has_lora\": %d, \"has_prompt_cache\": %d, \"userdata_null\": %d, "
               "\"kv_before\": %d",
               in->enable_thinking, n_tokens, crc, ip->mode, ip->keep_history, ip->max_new_tokens,
               ip->lora_params != NULL, ip->prompt_cache_params != NULL, userdata == NULL, h->kv_size);
    if (sp)
        buf_printf(&g.runs,
                   ", \"sampling\": {\"top_k\": %d, \"top_p\": %.6g, \"temperature\": %.6g, \"repeat_penalty\": %.6g, "
                   "\"frequency_penalty\": %.6g, \"presence_penalty\": %.6g, \"mirostat\": %d, \"mirostat_tau\": "
                   "%.6g, \"mirostat_eta\": %.6g}}",
                   sp->top_k, sp->top_p, sp->temperature, sp->repeat_penalty, sp->frequency_penalty,
                   sp->presence_penalty, sp->mirostat, sp->mirostat_tau, sp->mirostat_eta);
    else
        buf_printf(&g.runs, ", \"sampling\": null}");
    const char *refuse = NULL;
    if (in->input_type != RKLLM_INPUT_EMBED)
        refuse = "input_type is not RKLLM_INPUT_EMBED";
    else if (!in->embed_input.embed || n_tokens == 0)
        refuse = "empty EMBED input";
    else if (ip->mode != RKLLM_INFER_GENERATE)
        refuse = "mode is not RKLLM_INFER_GENERATE";
    else if ((ip->keep_history ? h->kv_size : 0) + (int)n_tokens + h->template_tokens > h->max_context_len)
        refuse = "input longer than max_context_len";
    if (refuse) error_locked(fn, refuse);
    const char *scenario = h->scenario;
    if (!refuse && strcmp(scenario, "run_fail") == 0) refuse = "run_fail scenario";
    write_report_locked();
    pthread_mutex_unlock(&g_mu);
    if (refuse) return -1;

    void *ud = userdata ? userdata : h->cb.result_userdata;
    __atomic_store_n(&h->abort_flag, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&h->running, 1, __ATOMIC_SEQ_CST);
    int limit = ip->max_new_tokens > 0 ? ip->max_new_tokens : h->max_new_tokens;
    const Token *script = STREAM;
    int script_len = 3;
    if (strcmp(scenario, "utf8") == 0) script = UTF8, script_len = 5;
    if (strcmp(scenario, "utf8_resend") == 0) script = UTF8_RESEND, script_len = 3;
    int slow = strcmp(scenario, "slow") == 0, eos = strcmp(scenario, "eos") == 0;
    int generated = 0, rc = 0;
    for (int i = 0; slow || eos ? i < limit : i < script_len && i < limit; i++) {
        if (__atomic_load_n(&h->abort_flag, __ATOMIC_SEQ_CST)) break;
        if (strcmp(scenario, "error_state") == 0 && i == 1) {
            RKLLMResult r;
            memset(&r, 0, sizeof r);
            h->cb.result_callback(&r, ud, RKLLM_RUN_ERROR);
            __atomic_store_n(&h->running, 0, __ATOMIC_SEQ_CST);
            return 0; /* the state, not the return code, carries this error */
        }
        char text[32];
        if (slow || eos) {
            sleep_ms(20);
            snprintf(text, sizeof text, "tok%d ", i);
        }
        int32_t id = eos && i == 1 ? h->eos_id : h->token_base + i; /* eos: the end-of-turn id, then more */
        int ret = slow || eos ? emit(h, ud, eos && i == 1 ? "" : text, id, RKLLM_RUN_NORMAL)
                              : emit(h, ud, script[i].text, script[i].token_id, script[i].state);
        generated++;
        if (ret == 1) break; /* paused by the caller */
    }
    if (h->stream_eos && !slow && !eos && generated == script_len && generated < limit &&
        !__atomic_load_n(&h->abort_flag, __ATOMIC_SEQ_CST)) {
        emit(h, ud, "", h->eos_id, RKLLM_RUN_NORMAL);
        generated++;
    }
    int prefilled = (int)n_tokens + h->template_tokens;
    finish(h, ud, strcmp(scenario, "miscount") == 0 ? prefilled + 1 : prefilled, generated);
    pthread_mutex_lock(&g_mu);
    h->kv_size = strcmp(scenario, "loses_cache") == 0 ? 0 : (ip->keep_history ? h->kv_size : 0) + prefilled + generated;
    write_report_locked();
    pthread_mutex_unlock(&g_mu);
    __atomic_store_n(&h->running, 0, __ATOMIC_SEQ_CST);
    return rc;
}

EXPORT int rkllm_run(LLMHandle handle, RKLLMInput *in, RKLLMInferParam *ip, void *userdata) {
    return run(handle, in, ip, userdata, "rkllm_run");
}

/* The double runs "async" calls to completion before returning; the binding does not use them. */
EXPORT int rkllm_run_async(LLMHandle handle, RKLLMInput *in, RKLLMInferParam *ip, void *userdata) {
    return run(handle, in, ip, userdata, "rkllm_run_async");
}

EXPORT int rkllm_abort(LLMHandle handle) {
    pthread_mutex_lock(&g_mu);
    FakeHandle *h = lookup_locked(handle, "rkllm_abort");
    if (h) {
        g.aborts++;
        __atomic_store_n(&h->abort_flag, 1, __ATOMIC_SEQ_CST);
        write_report_locked();
    }
    pthread_mutex_unlock(&g_mu);
    return h ? 0 : -1;
}

EXPORT int rkllm_is_running(LLMHandle handle) {
    pthread_mutex_lock(&g_mu);
    FakeHandle *h = lookup_locked(handle, "rkllm_is_running");
    g.is_running_calls++;
    pthread_mutex_unlock(&g_mu);
    return h ? __atomic_load_n(&h->running, __ATOMIC_SEQ_CST) : 0;
}

EXPORT int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    pthread_mutex_lock(&g_mu);
    FakeHandle *h = lookup_locked(handle, "rkllm_clear_kv_cache");
    if (h) {
        g.clears++;
        if (keep_system_prompt != 0 || start_pos || end_pos)
            error_locked("rkllm_clear_kv_cache", "expected a full clear (0, NULL, NULL)");
        h->kv_size = 0;
        write_report_locked();
    }
    pthread_mutex_unlock(&g_mu);
    return h ? 0 : -1;
}

static int other_call(LLMHandle handle, const char *fn) {
    pthread_mutex_lock(&g_mu);
    FakeHandle *h = lookup_locked(handle, fn);
    if (h) g.other_calls++;
    write_report_locked();
    pthread_mutex_unlock(&g_mu);
    return h ? 0 : -1;
}

EXPORT int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter) {
    return lora_adapter ? other_call(handle, "rkllm_load_lora") : -1;
}

EXPORT int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path) {
    return prompt_cache_path ? other_call(handle, "rkllm_load_prompt_cache") : -1;
}

EXPORT int rkllm_release_prompt_cache(LLMHandle handle) { return other_call(handle, "rkllm_release_prompt_cache"); }

EXPORT int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                   const char *prompt_postfix) {
    if (!system_prompt || !prompt_prefix || !prompt_postfix) return -1;
    pthread_mutex_lock(&g_mu);
    FakeHandle *h = lookup_locked(handle, "rkllm_set_chat_template");
    int rc = -1;
    if (h) {
        g.other_calls++;
        if (g.templates.n) buf_printf(&g.templates, ", ");
        buf_printf(&g.templates, "{\"system_prompt\": ");
        buf_json_str(&g.templates, system_prompt);
        buf_printf(&g.templates, ", \"prompt_prefix\": ");
        buf_json_str(&g.templates, prompt_prefix);
        buf_printf(&g.templates, ", \"prompt_postfix\": ");
        buf_json_str(&g.templates, prompt_postfix);
        buf_printf(&g.templates, "}");
        rc = strcmp(h->scenario, "template_fail") == 0 ? -1 : 0;
        if (rc == 0 && !*system_prompt && !*prompt_prefix && !*prompt_postfix) h->template_tokens = 0;
        write_report_locked();
    }
    pthread_mutex_unlock(&g_mu);
    return rc;
}

#ifndef FAKE_BEFORE_1_2_1
EXPORT int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    pthread_mutex_lock(&g_mu);
    FakeHandle *h = lookup_locked(handle, "rkllm_get_kv_cache_size");
    if (h && cache_sizes) cache_sizes[0] = h->kv_size;
    pthread_mutex_unlock(&g_mu);
    return h && cache_sizes ? 0 : -1;
}

EXPORT int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                    const char *tool_response_str) {
    return system_prompt && tools && tool_response_str ? other_call(handle, "rkllm_set_function_tools") : -1;
}

EXPORT int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params) {
    return cross_attn_params ? other_call(handle, "rkllm_set_cross_attn_params") : -1;
}
#endif
