"""The use-cases of foundex, shared by both faces (REST routes in `api.routes`, CLI commands in
`api.cli`). Each takes one `ServiceContext` and returns a result object or raises a domain
error from `api.services.errors`; the faces only parse, call and present.
"""
