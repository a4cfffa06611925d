"""batchlm: run a large language model over a large dataset, offline, fast."""
from batchlm.outputs import ClassificationOutput, CompletionOutput, RequestOutput
from batchlm.sampling_params import SamplingParams
from batchlm.structured import StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in torch and the engine; import it on first use so that light
    # users (the CLI parser, the pipeline config) stay light.
    if name == "LLM":
        from batchlm.llm import LLM

        return LLM
    if name == "LLMEngine":
        from batchlm.engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module 'batchlm' has no attribute {name!r}")


__all__ = ["LLM", "LLMEngine", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "ClassificationOutput"]
