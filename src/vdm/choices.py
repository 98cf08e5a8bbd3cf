"""Named choices shared by the library and the command line (no torch import, so `vdm --help` is fast)."""

PRECISIONS = ("auto", "bf16", "fp32")  # autocast precision; "auto" = bf16 only where the hardware has it natively
SAMPLER_NAMES = ("ancestral", "ddim", "dpmpp-2m", "dpmpp-3m", "ode")
DEFAULT_SAMPLER = "dpmpp-2m"  # 20 network calls (DEFAULT_STEPS); "ancestral" is the paper's 1000-step sampler
GRIDS = ("t", "lambda")  # time grids uniform in t or in the log-SNR λ = −γ/2
DEFAULT_STEPS = {"ancestral": 1000, "ddim": 20, "dpmpp-2m": 20, "dpmpp-3m": 20, "ode": None}
DEFAULT_GRID = {"ancestral": "t", "ddim": "lambda", "dpmpp-2m": "lambda", "dpmpp-3m": "lambda", "ode": "t"}
