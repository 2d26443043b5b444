"""Hugging Face Spaces entry point: ``python app.py [flags]`` (see ``mrg/demo.py`` for the flags)."""

from mrg.demo import main

if __name__ == "__main__":
    main()
