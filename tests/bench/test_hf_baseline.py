"""The transformers baseline on a tiny random model: token counts and eos handling."""
from batchlm.bench.hf_baseline import _cut, eos_token_ids, load_hf_model, run_hf


def test_cut_keeps_eos_and_drops_padding():
    assert _cut([5, 6, 2, 0, 0], {2}, 10) == [5, 6, 2]
    assert _cut([5, 6, 7, 8], {2}, 3) == [5, 6, 7]
    assert _cut([5, 2, 7], set(), 10) == [5, 2, 7]


def test_run_hf_counts_and_order(tiny_model_dir):
    model = load_hf_model(tiny_model_dir)
    prompts = [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [30, 31], [40, 41, 42, 43]]
    run = run_hf(model, prompts, max_tokens=6, batch_size=3, ignore_eos=True)
    assert run.num_prompts == 4 and run.num_prompt_tokens == 16
    assert [len(t) for t in run.token_ids] == [6, 6, 6, 6]
    assert run.num_output_tokens == 24 and run.wall_s > 0
    # Input order is kept: batch size 1 (no padding) gives the same continuations.
    single = run_hf(model, prompts, max_tokens=6, batch_size=1, ignore_eos=True, limit=2, warmup=False)
    assert single.num_prompts == 2 and single.token_ids == run.token_ids[:2]


def test_run_hf_stops_at_eos(tiny_model_dir):
    model = load_hf_model(tiny_model_dir)
    prompts = [[10, 11, 12], [20, 21, 22, 23]]
    free = run_hf(model, prompts, max_tokens=8, batch_size=2, ignore_eos=True, warmup=False)
    # Make the 3rd generated token of the first prompt the eos: it must stop there.
    eos = free.token_ids[0][2]
    model.generation_config.eos_token_id = eos
    assert eos_token_ids(model) == [eos]
    stopped = run_hf(model, prompts, max_tokens=8, batch_size=2, warmup=False)
    assert stopped.token_ids[0] == free.token_ids[0][:free.token_ids[0].index(eos) + 1]
    for row in stopped.token_ids:
        assert eos not in row[:-1]
