"""Argument parsing of `bench` and its extension hook."""
import sys
import types

import pytest

from batchlm.bench import cli


def test_throughput_defaults():
    args = cli.build_parser().parse_args(["bench", "throughput"])
    assert args.model == "smollm2-135m-instruct" and args.dtype == "auto" and args.quantization is None
    assert args.num_prompts is None and args.max_tokens == 128 and args.prompt_len_range == [100, 600]
    assert args.hf_batch_sizes == [1, 8, 16, 32] and args.baseline is None and args.repeats == 1
    assert args.task == "summarize" and args.speculative_config is None
    assert args.func is cli._run_throughput


def test_throughput_options():
    args = cli.build_parser().parse_args(
        ["bench", "throughput", "--dataset", "d.parquet", "--chat", "--baseline", "hf",
         "--hf-batch-sizes", "8,16", "--no-prefix-caching", "--json", "out.json", "--num-prompts", "4"])
    assert args.chat == "summarize" and args.hf_batch_sizes == [8, 16] and args.no_prefix_caching
    assert cli.build_parser().parse_args(["bench", "throughput", "--chat", "raw"]).chat == "raw"
    args = cli.build_parser().parse_args(["bench", "throughput", "--task", "rewrite", "--speculative-config",
                                          '{"method": "ngram", "num_speculative_tokens": 4}'])
    assert args.task == "rewrite" and args.speculative_config == {"method": "ngram", "num_speculative_tokens": 4}
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "throughput", "--speculative-config", "[1]"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "throughput", "--hf-batch-sizes", "0,x"])


def test_classify_and_required_subcommand():
    args = cli.build_parser().parse_args(["bench", "classify", "--num-rows", "8", "--only", "on"])
    assert args.num_rows == 8 and args.only == "on" and args.func is cli._run_classify
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench"])


def test_module_imports_only_stdlib():
    code = ("import sys; import batchlm.bench.cli; "
            "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    import subprocess
    subprocess.run([sys.executable, "-c", code], check=True)


def test_extension_hook(monkeypatch):
    mod = types.ModuleType("fake_bench_ext")
    mod.register = lambda sub: sub.add_parser("pipeline").set_defaults(func=lambda a: 7)
    monkeypatch.setitem(sys.modules, "fake_bench_ext", mod)
    monkeypatch.setattr(cli, "EXTRA_BENCH_MODULES", ("fake_bench_ext", "not_a_module_xyz.bench"))
    args = cli.build_parser().parse_args(["bench", "pipeline"])
    assert args.func(args) == 7


def test_attention_backend_choices_are_the_engines():
    from batchlm.kernels.dispatch import ATTENTION_BACKENDS

    p = cli.build_parser()
    for name in ATTENTION_BACKENDS:
        assert p.parse_args(["bench", "throughput", "--attention-backend", name]).attention_backend == name
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "throughput", "--attention-backend", "cuda"])
