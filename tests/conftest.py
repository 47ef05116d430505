import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The default teacher, SmolLM2-135M-Instruct (dequantized GGUF from PyPI), loaded once per test session."""
    from llamba.teacher import load_teacher

    return load_teacher("smollm2-135m")
