"""The HTTP layer both apps share (`slmtune serve` and `slmtune api`).

errors.py   OpenAI-shaped errors: ApiError, the error body, validation-error mapping, exception handlers
"""
