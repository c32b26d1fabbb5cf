"""One router per resource, included by ``service.app`` in this order (the contract's order):

    jobs         /v1/jobs: submit, list, read, cancel, archive, preview
    evaluations  /v1/jobs/{id}/evaluations
    models       /v1/models
    presets      /v1/presets
    references   /v1/references: streamed uploads (their own size limit), list, get, delete
    health       /healthz, /readyz, /metrics
    ui           the operator page (/ and /jobs/<id>)

Routes stay thin: they read the request, call the module below them and shape the answer.
Their dependencies and answer helpers are ``service.deps``.
"""
