"""A 262,144-token vocabulary with 10 x 256 calibration tokens prunes a step under a 1.5 GB memory cap.

The cap is RLIMIT_DATA (heap and anonymous mappings: the memory a process really allocates; the address-space
limit would also count the ~0.8 GB of mapped libraries). Full-vocabulary logits for all positions would be
2.7 GB in float32, so this only passes if the search never holds them at once.
"""

import resource
import subprocess
import sys
import textwrap

CAP_BYTES = int(1.5 * 2**30)

SEARCH_ONE_STEP = textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from finercut.adapters import adapter_for
    from finercut.distances import metric_named
    from finercut.scoring import FastScorer, ScoringContext
    from finercut.search import greedy_search

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (10, 256))
    context = ScoringContext.build(model, adapter_for(model), metric_named("js"), input_ids)
    steps = greedy_search(FastScorer(context), num_blocks=2, granularity="sublayer", target=1,
                          window_until_ratio=0.4, window_first_block=1)
    print("removed", steps[0].unit, "kept reference", context.reference.keeps_prepared)
    """
)

ALLOCATE_2_GB = "import torch; torch.empty(2 * 2**30, dtype=torch.uint8).fill_(1); print('allocated')"


def run_capped(code: str) -> subprocess.CompletedProcess:
    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_DATA, (CAP_BYTES, CAP_BYTES))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          preexec_fn=limit_address_space, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})


def test_the_cap_really_limits_memory():
    result = run_capped(ALLOCATE_2_GB)
    assert result.returncode != 0 and "allocated" not in result.stdout


def test_holding_the_whole_prepared_reference_would_not_fit():
    # The same search told to keep every prepared chunk: proof that the cap would catch the careless way.
    careless = SEARCH_ONE_STEP.replace('metric_named("js"), input_ids)',
                                       'metric_named("js"), input_ids, max_reference_bytes=2**40)')
    assert careless != SEARCH_ONE_STEP
    result = run_capped(careless)
    assert result.returncode != 0 and "can't allocate memory" in result.stderr


def test_one_step_with_262k_vocabulary_fits_under_the_cap():
    result = run_capped(SEARCH_ONE_STEP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removed 1." in result.stdout and "kept reference False" in result.stdout
