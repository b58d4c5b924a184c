"""The request frontend: a request's steering resolved from its sources (profiles, header, body) into a plan and a
cache salt, chat rendering with token offsets, prompt-level methods (URIAL, conjugate prompting), and one
generation request's fan-out to the engine and rendering back to OpenAI JSON."""
