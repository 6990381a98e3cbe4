"""Quiet two third-party warnings that every `import ldm_pipeline` would print, both about backends we never use.

- bitsandbytes (imported by peft) warns that its optional 4-bit CPU kernel could not be fetched from the Hub
  (it never can offline); nothing here runs 4-bit kernels.
- transformers warns that `CLIPImageProcessor` falls back to its PIL implementation without torchvision;
  the PIL one is what SD folders' feature extractors have always used.
Imported first by the package, before peft or transformers load.
"""

import logging

for _name in ("bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils"):
    logging.getLogger(_name).setLevel(logging.ERROR)
