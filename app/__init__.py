"""The HART web demo: `python -m hart.app --model DIR` (see `app.demo.build_demo`, `app.safety`)."""
