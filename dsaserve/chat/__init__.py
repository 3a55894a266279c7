"""Chat formats: DeepSeek-V3.2's encoding and Jinja templates, tool-call and reasoning parsers, grammars."""
