"""The service on Ray Serve, past one machine (DESIGN.md, "Past one machine").

Two deployments wrap the single-process code; nothing here re-implements it:

- `Glipv2Ingress` (`ingress.py`, CPU): the FastAPI app of `service.app` as it is (routes, auth,
  limits, image decoding, chunk planning, post-processing, rendering, the jobs API), its
  serving layer over `RemoteEngineClient` (`remote.py`) instead of a runtime.
- `Glipv2Engine` (`engine.py`, a GPU or a fraction of one): the runtime and the per-engine
  batchers (an `EngineClient`); every task stage of a request is one call to it.

`app.py` builds the application (`glipv2 serve --ray`, and `serve deploy` of
`docker/ray/serve.yaml` through `build`); `routing.py` keeps a request's stages on the replica
holding its image features; `metrics.py` exports the service's metrics through Ray's;
`serve_env.py` is how Serve's own request path is set up (HAProxy, no thread hops).
Importing this package needs the `ray` extra (`pip install -e '.[ray]'`).
"""
