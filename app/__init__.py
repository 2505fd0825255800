"""The HART web demo: `python -m app --model DIR` (see `app.demo.build_demo`, `app.safety`)."""
