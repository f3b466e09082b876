"""The library's views, registered on the resources' classes."""

from html import escape

from pyramid.httpexceptions import HTTPFound, HTTPSeeOther
from pyramid.response import Response
from pyramid.view import notfound_view_config, view_config

from .resources import Author, Authors, Book, Books, Root


def page(request, title, body, status=200):
    """An HTML page around ``body``; every link in it is absolute."""
    root = request.resource_url(request.root)
    html = (
        "<!DOCTYPE html>\n<html>\n<head>\n"
        f"  <title>{escape(title)}</title>\n"
        f'  <link rel="canonical" href="{escape(request.path_url)}">\n'
        "</head>\n<body>\n"
        f'  <nav><a href="{escape(root)}">Library</a> '
        f'<a href="{escape(root)}api">API</a></nav>\n'
        f"  <h1>{escape(title)}</h1>\n{body}</body>\n</html>\n"
    )
    return Response(html, status=status, content_type="text/html")


def links(request, resources):
    items = "".join(
        f'    <li><a href="{escape(request.resource_url(resource))}">'
        f"{escape(resource.title)}</a></li>\n"
        for resource in resources
    )
    return f"  <ul>\n{items}  </ul>\n"


@view_config(context=Root)
def home(request):
    children = request.context.children.values()
    return page(request, request.context.title, links(request, children))


@view_config(context=Root, name="api", renderer="json")
def api_root(request):
    root = request.context
    return {
        "application_url": request.application_url,
        "self": request.url,
        "collections": {
            name: request.resource_url(child) for name, child in root.children.items()
        },
        "latest_book": request.resource_url(root["books"], "latest"),
        "client_addr": request.client_addr,
        "scheme": request.scheme,
    }


@view_config(context=Books)
@view_config(context=Authors)
def collection(request):
    items = request.context.children.values()
    return page(request, request.context.title, links(request, items))


@view_config(context=Books, name="latest")
def latest(request):
    return HTTPFound(request.resource_url(request.context.latest()))


@view_config(context=Book)
def book(request):
    book = request.context
    reserve_url = request.resource_url(book, "reserve")
    body = (
        f'  <p>By <a href="{escape(request.resource_url(book.author))}">'
        f"{escape(book.author.title)}</a></p>\n"
        f'  <form method="post" action="{escape(reserve_url)}">'
        "<button>Reserve</button></form>\n"
        f'  <a href="{escape(request.resource_url(book.__parent__))}">All books</a>\n'
    )
    response = page(request, book.title, body)
    response.md5_etag()
    response.conditional_response = True
    return response


@view_config(context=Book, name="reserve", request_method="POST")
def reserve(request):
    book = request.context
    response = HTTPSeeOther(request.resource_url(book))
    response.set_cookie(
        "reserved",
        book.__name__,
        path=request.script_name or "/",
        httponly=True,
        secure=request.scheme == "https",
    )
    return response


@view_config(context=Author)
def author(request):
    author = request.context
    if not request.path.endswith("/"):
        # One URL per resource: its resource_url, with the trailing slash.
        return HTTPFound(request.resource_url(author))
    return page(request, author.title, links(request, author.books()))


@notfound_view_config()
def notfound(request):
    body = f"  <p>Nothing at {escape(request.path)}.</p>\n"
    return page(request, "Not found", body, status=404)
