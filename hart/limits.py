"""Defaults and limits of every generation argument: the pipelines, the `hart` commands, the app and
training read them from here, so each is written once. Import-light on purpose (no torch)."""

# ---- defaults ---------------------------------------------------------------------------------------
GUIDANCE_SCALE = 4.5  # the release's classifier-free guidance weight
MORE_SMOOTH = True  # the release's gumbel-softmax soft codes (its scripts' default)
STALE_LAST_SCALE_GUIDANCE = True  # the release's last-scale guidance weight (docs/architecture.md)
NUM_MASKGIT_ITERS = 1  # the last scale's tokens in one step, as released
SEED = 0

# ---- limits -----------------------------------------------------------------------------------------
# Far beyond any useful weight (1-10); larger ones overflow the guided logits to inf in float32.
MAX_GUIDANCE_SCALE = 1000.0
# The largest whole number a browser keeps exactly (the app's seed field is a JavaScript number);
# torch generators take any 64-bit seed, so the CLI's seed + i stays valid far beyond it.
MAX_SEED = 2**53 - 1
MAX_PROMPT_CHARS = 2000  # longer text is certainly truncated to the model's text tokens (300 for the release)
MAX_IMAGES_PER_REQUEST = 4  # the app's default cap on images per request
# A `hart` run of more images prints its estimated time and asks first (--yes answers for you);
# at the release's size that is hours of CPU time.
CONFIRM_IMAGES = 256
MAX_IMAGES_PER_RUN = 1_000_000  # beyond any run worth starting; the job list alone would fill the memory
MAX_IMAGE_SIDE = 16384  # pixels: image sizes, offsets and blend radii beyond any canvas HART works at
