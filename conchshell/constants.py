"""Facts of the paper and the BOPD dataset that several modules share."""

# BOPD folder suffix 1..6 maps to these, in this order (class id = suffix - 1).
CLASS_NAMES: tuple[str, ...] = ("coast", "island", "sand_beach", "coral_reef", "deep", "ocean_wave")
NUM_CLASSES = len(CLASS_NAMES)

SAMPLE_RATE = 16_000
CLIP_SECONDS = 8.0
IMAGE_SIZE = 224

# Per-channel statistics of the BOPD images (RGB), used to normalise every input image.
IMAGE_MEAN: tuple[float, float, float] = (0.3463, 0.4774, 0.5486)
IMAGE_STD: tuple[float, float, float] = (0.2262, 0.2021, 0.2206)

# Numeric precisions a run can use; fp16 is never offered (it is ~70x slower than fp32 on CPU).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
# Generation may also mix them: "mixed" runs the image networks (TCNN, I3D) in bf16 and keeps
# the generator (its bf16 rounding moves latents across codebook cells) and the decoder (whose
# bf16 rounding the evaluation's classifier hears) in fp32.
INFERENCE_PRECISIONS: tuple[str, ...] = (*PRECISIONS, "mixed")

# Jukebox level index -> paper's generator name. Level 0 has the finest hop.
LEVEL_NAMES: dict[int, str] = {0: "deep", 1: "low", 2: "high"}
