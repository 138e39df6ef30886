"""The service's routes, one APIRouter per resource; each route checks input and calls a function
over the Service (slmtune/service/core.py, jobs.py, files.py).

files.py     /v1/files
jobs.py      /v1/fine_tuning/jobs (+ events, checkpoints, cancel / pause / resume)
models.py    /v1/models, /health
console.py   / (the web console) and /v1/slmtune/* helpers its wizard uses
"""
