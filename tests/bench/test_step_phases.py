"""`bench throughput --step-phases`: each phase of the engine's step timed on
the engine's own objects, put back afterwards. Never asserts on speed."""
import pytest

from batchlm.bench import cli

pytest.importorskip("batchlm.engine.llm_engine")


def test_phases_count_every_step_and_the_engine_is_put_back(tiny_model_dir):
    from batchlm import LLM, SamplingParams
    from batchlm.bench.step_phases import StepPhases

    llm = LLM(model=tiny_model_dir, dtype="float32", max_num_seqs=4)
    engine = llm.engine
    steps = []
    original_step = engine.step

    def counting_step():
        steps.append(1)
        return original_step()

    engine.step = counting_step  # counted outside the timers
    phases = StepPhases(engine)
    outs = llm.generate([[5, 6, 7, 8, 9] * 3] * 6, SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 5 for o in outs)
    calls, total = phases.calls, phases.total
    assert calls["whole step"] == len(steps) > 5  # 6 requests of 5 tokens through 4 slots
    assert calls["schedule"] == len(steps) and calls["sampling + stop checks"] >= 5
    assert 0 < total["model run"] + total["logits"] + total["sampling + stop checks"] <= total["whole step"]
    text = phases.report()
    assert "whole step" in text and "rest of the step" in text
    phases.remove()
    assert "step" in vars(engine) and vars(engine)["step"] is counting_step  # ours, not the timer's
    del engine.step
    assert not any(m in vars(engine.runner) for m in ("run", "logits", "_prepare", "_graph_step"))
    assert not any(m in vars(engine.scheduler) for m in ("schedule", "update_after_step"))
    phases.reset()
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not phases.calls  # nothing timed once removed


def test_throughput_prints_the_phases(tiny_model_dir, capsys):
    args = cli.build_parser().parse_args(["bench", "throughput", "--model", tiny_model_dir, "--num-prompts", "3",
                                          "--prompt-len-range", "100", "140", "--max-tokens", "4", "--step-phases"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "one more run with each phase of the step timed" in text
    for label in ("schedule", "model run", "logits", "sampling + stop checks", "whole step"):
        assert label in text
