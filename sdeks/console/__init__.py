"""`sdeks console`: a web page to watch the pipeline and look at what it made.

    backend.py   reads the task table, queues, output and models buckets, pods
    forms.py     the submit form -> a task envelope (validated like `sdeks submit`)
    server.py    a stdlib HTTP server: the JSON API and the static page
    static/      the page itself (plain HTML, CSS and JavaScript; no build step)

The server needs nothing beyond the base install (boto3, pydantic): the
dispatcher and runtime images gain no dependency from it. See docs/local.md
and docs/operate.md.
"""
