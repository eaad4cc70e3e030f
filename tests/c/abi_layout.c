/* Prints the size of every ABI type and the offset of every field, as the C compiler lays them out
 * from tests/c/rkllm_abi.h: "size <Type> <n>" and "offset <Type>.<field> <n>", one per line.
 * test_rkllm_abi.py compares this output with the literal table it carries (and the ctypes
 * binding with the same table), so a wrong declaration on either side shows up.
 */
#include <stdio.h>

#include "rkllm_abi.h"

#define SIZE(T) printf("size %s %zu\n", #T, sizeof(T))
#define OFF(T, f) printf("offset %s.%s %zu\n", #T, #f, offsetof(T, f))

int main(void) {
    SIZE(RKLLMExtendParam);
    OFF(RKLLMExtendParam, base_domain_id);
    OFF(RKLLMExtendParam, embed_flash);
    OFF(RKLLMExtendParam, enabled_cpus_num);
    OFF(RKLLMExtendParam, enabled_cpus_mask);
    OFF(RKLLMExtendParam, n_batch);
    OFF(RKLLMExtendParam, use_cross_attn);
    OFF(RKLLMExtendParam, reserved);

    SIZE(RKLLMParam);
    OFF(RKLLMParam, model_path);
    OFF(RKLLMParam, max_context_len);
    OFF(RKLLMParam, max_new_tokens);
    OFF(RKLLMParam, top_k);
    OFF(RKLLMParam, n_keep);
    OFF(RKLLMParam, top_p);
    OFF(RKLLMParam, temperature);
    OFF(RKLLMParam, repeat_penalty);
    OFF(RKLLMParam, frequency_penalty);
    OFF(RKLLMParam, presence_penalty);
    OFF(RKLLMParam, mirostat);
    OFF(RKLLMParam, mirostat_tau);
    OFF(RKLLMParam, mirostat_eta);
    OFF(RKLLMParam, skip_special_token);
    OFF(RKLLMParam, ignore_eos_token);
    OFF(RKLLMParam, is_async);
    OFF(RKLLMParam, extend_param);

    SIZE(RKLLMLoraAdapter);
    OFF(RKLLMLoraAdapter, lora_adapter_path);
    OFF(RKLLMLoraAdapter, lora_adapter_name);
    OFF(RKLLMLoraAdapter, scale);

    SIZE(RKLLMEmbedInput);
    OFF(RKLLMEmbedInput, embed);
    OFF(RKLLMEmbedInput, n_tokens);

    SIZE(RKLLMTokenInput);
    OFF(RKLLMTokenInput, input_ids);
    OFF(RKLLMTokenInput, n_tokens);

    SIZE(RKLLMMultiModalInputImage);
    OFF(RKLLMMultiModalInputImage, image_embed);
    OFF(RKLLMMultiModalInputImage, n_image_tokens);
    OFF(RKLLMMultiModalInputImage, n_image);
    OFF(RKLLMMultiModalInputImage, image_start);
    OFF(RKLLMMultiModalInputImage, image_end);
    OFF(RKLLMMultiModalInputImage, image_content);
    OFF(RKLLMMultiModalInputImage, image_width);
    OFF(RKLLMMultiModalInputImage, image_height);

    SIZE(RKLLMMultiModalInputVideo);
    OFF(RKLLMMultiModalInputVideo, video_embed);
    OFF(RKLLMMultiModalInputVideo, n_frame_tokens);
    OFF(RKLLMMultiModalInputVideo, n_frame_per_video);
    OFF(RKLLMMultiModalInputVideo, n_video);
    OFF(RKLLMMultiModalInputVideo, video_start);
    OFF(RKLLMMultiModalInputVideo, video_end);
    OFF(RKLLMMultiModalInputVideo, video_content);
    OFF(RKLLMMultiModalInputVideo, frame_width);
    OFF(RKLLMMultiModalInputVideo, frame_height);

    SIZE(RKLLMMultiModalInput);
    OFF(RKLLMMultiModalInput, prompt);
    OFF(RKLLMMultiModalInput, image);
    OFF(RKLLMMultiModalInput, video);

    SIZE(RKLLMInput);
    OFF(RKLLMInput, role);
    OFF(RKLLMInput, enable_thinking);
    OFF(RKLLMInput, input_type);
    OFF(RKLLMInput, prompt_input);
    OFF(RKLLMInput, embed_input);
    OFF(RKLLMInput, token_input);
    OFF(RKLLMInput, multimodal_input);

    SIZE(RKLLMLoraParam);
    OFF(RKLLMLoraParam, lora_adapter_name);

    SIZE(RKLLMPromptCacheParam);
    OFF(RKLLMPromptCacheParam, save_prompt_cache);
    OFF(RKLLMPromptCacheParam, prompt_cache_path);

    SIZE(RKLLMCrossAttnParam);
    OFF(RKLLMCrossAttnParam, encoder_k_cache);
    OFF(RKLLMCrossAttnParam, encoder_v_cache);
    OFF(RKLLMCrossAttnParam, encoder_mask);
    OFF(RKLLMCrossAttnParam, encoder_pos);
    OFF(RKLLMCrossAttnParam, num_tokens);

    SIZE(RKLLMSamplingParam);
    OFF(RKLLMSamplingParam, top_k);
    OFF(RKLLMSamplingParam, top_p);
    OFF(RKLLMSamplingParam, temperature);
    OFF(RKLLMSamplingParam, repeat_penalty);
    OFF(RKLLMSamplingParam, frequency_penalty);
    OFF(RKLLMSamplingParam, presence_penalty);
    OFF(RKLLMSamplingParam, mirostat);
    OFF(RKLLMSamplingParam, mirostat_tau);
    OFF(RKLLMSamplingParam, mirostat_eta);

    SIZE(RKLLMInferParam);
    OFF(RKLLMInferParam, mode);
    OFF(RKLLMInferParam, lora_params);
    OFF(RKLLMInferParam, prompt_cache_params);
    OFF(RKLLMInferParam, sampling_params);
    OFF(RKLLMInferParam, keep_history);
    OFF(RKLLMInferParam, max_new_tokens);

    SIZE(RKLLMResultLastHiddenLayer);
    OFF(RKLLMResultLastHiddenLayer, hidden_states);
    OFF(RKLLMResultLastHiddenLayer, embd_size);
    OFF(RKLLMResultLastHiddenLayer, num_tokens);

    SIZE(RKLLMResultLogits);
    OFF(RKLLMResultLogits, logits);
    OFF(RKLLMResultLogits, vocab_size);
    OFF(RKLLMResultLogits, num_tokens);

    SIZE(RKLLMPerfStat);
    OFF(RKLLMPerfStat, prefill_time_ms);
    OFF(RKLLMPerfStat, prefill_tokens);
    OFF(RKLLMPerfStat, generate_time_ms);
    OFF(RKLLMPerfStat, generate_tokens);
    OFF(RKLLMPerfStat, memory_usage_mb);

    SIZE(RKLLMResult);
    OFF(RKLLMResult, text);
    OFF(RKLLMResult, token_id);
    OFF(RKLLMResult, last_hidden_layer);
    OFF(RKLLMResult, logits);
    OFF(RKLLMResult, perf);

    SIZE(RKLLMCallback);
    OFF(RKLLMCallback, result_callback);
    OFF(RKLLMCallback, result_userdata);
    OFF(RKLLMCallback, tokenizer_callback);
    OFF(RKLLMCallback, tokenizer_userdata);
    OFF(RKLLMCallback, embed_callback);
    OFF(RKLLMCallback, embed_userdata);
    return 0;
}
