"""The shop's views."""

from pyramid.httpexceptions import (
    HTTPFound,
    HTTPMovedPermanently,
    HTTPNotFound,
    HTTPSeeOther,
    HTTPServiceUnavailable,
)
from pyramid.renderers import render_to_response
from pyramid.view import notfound_view_config, view_config

PRODUCTS = {
    n: {"id": n, "name": f"Product {n:02d}", "price": 100 + 7 * n} for n in range(1, 26)
}
PAGE_SIZE = 10
PAGES = (len(PRODUCTS) + PAGE_SIZE - 1) // PAGE_SIZE
SORTS = ("name", "price")


@view_config(route_name="home")
def home(request):
    return HTTPFound(request.route_url("products"))


@view_config(route_name="catalogue")
def catalogue(request):
    # A relative Location: WebOb makes it absolute from the request.
    return HTTPMovedPermanently(location="/products?page=2")


@view_config(route_name="products", renderer="templates/products.html")
def products(request):
    try:
        page = int(request.GET.get("page", "1"))
    except ValueError:
        raise HTTPNotFound() from None
    sort = request.GET.get("sort", "name")
    if not 1 <= page <= PAGES or sort not in SORTS:
        raise HTTPNotFound()
    items = sorted(PRODUCTS.values(), key=lambda p: (p[sort], p["id"]))
    start = (page - 1) * PAGE_SIZE

    def page_url(number):
        return request.route_url("products", _query={"page": number, "sort": sort})

    return {
        "items": items[start : start + PAGE_SIZE],
        "page": page,
        "pages": PAGES,
        "prev_url": page_url(page - 1) if page > 1 else None,
        "next_url": page_url(page + 1) if page < PAGES else None,
    }


@view_config(route_name="product", renderer="templates/product.html")
def product(request):
    item = PRODUCTS.get(int(request.matchdict["id"]))
    if item is None:
        raise HTTPNotFound()
    page = (item["id"] - 1) // PAGE_SIZE + 1
    return {
        "item": item,
        "back_url": request.route_url("products", _query={"page": page}),
    }


def cart_items(request):
    return [int(i) for i in request.cookies.get("cart", "").split(".") if i.isdigit()]


@view_config(route_name="cart", request_method="GET", renderer="templates/cart.html")
def cart(request):
    return {"items": [PRODUCTS[i] for i in cart_items(request) if i in PRODUCTS]}


@view_config(route_name="cart", request_method="POST")
def add_to_cart(request):
    item = request.POST.get("item", "")
    if not item.isdigit() or int(item) not in PRODUCTS:
        raise HTTPNotFound()
    items = [*cart_items(request), int(item)]
    # Post/redirect/get, with a plain cookie (no max_age: no dates in it).
    response = HTTPSeeOther(request.route_url("cart"))
    response.set_cookie(
        "cart",
        ".".join(str(i) for i in items),
        path=request.script_name or "/",
        httponly=True,
        samesite="Lax",
        secure=request.scheme == "https",
    )
    return response


ABOUT = {
    "en": "A shop that sells products.",
    "fr": "Une boutique qui vend des produits.",
}


@view_config(route_name="about")
def about(request):
    language = request.accept_language.lookup(list(ABOUT), default="en")
    response = render_to_response(
        "templates/about.html",
        {"language": language, "text": ABOUT[language]},
        request=request,
    )
    response.vary = ("Accept-Language",)
    response.content_language = language
    # An ETag of the body, and 304 to a client that has it.
    response.md5_etag()
    response.conditional_response = True
    return response


@view_config(route_name="help", renderer="templates/help.html")
def help_page(request):
    return {}


@view_config(route_name="whoami", renderer="json")
def whoami(request):
    return {
        "client_addr": request.client_addr,
        "scheme": request.scheme,
        "host": request.host,
        "host_url": request.host_url,
        "application_url": request.application_url,
        "url": request.url,
        "products": request.route_url("products"),
        "css": request.static_url("tests.realapps.shop:static/shop.css"),
    }


@view_config(route_name="orders")
def orders(request):
    """Closed for a stocktake: a deliberate 503, the rest of the shop open."""
    return HTTPServiceUnavailable(
        "Orders are closed for a stocktake.", headers={"Retry-After": "120"}
    )


@view_config(route_name="ping", renderer="string")
def ping(request):
    return "ok"


@notfound_view_config(append_slash=HTTPMovedPermanently, renderer="templates/404.html")
def notfound(request):
    request.response.status = 404
    return {"path": request.path}
