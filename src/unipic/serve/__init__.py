"""`unipic serve`: an OpenAI-compatible HTTP server and a web page over any `UnifiedPipeline`.

- `limits.py`: the configurable bounds on requests (sizes, counts, queue);
- `errors.py`: OpenAI-shaped error bodies;
- `images.py`: safe decoding of uploads and data URLs, PNG encoding with settings in text chunks;
- `multipart.py`: an in-memory multipart/form-data parser (uploads never touch the disk);
- `batching.py`: the bounded queue that groups compatible requests into one pipeline call;
- `app.py`: the FastAPI application (endpoints, auth, body-size limit);
- `page.html`: the self-contained web page served at `/`;
- `cli.py`: the `unipic serve` command (uvicorn).

FastAPI and uvicorn are optional dependencies: `pip install "unipic[serve]"`.
"""

from unipic.serve.limits import ServeLimits

__all__ = ["ServeLimits"]
