"""The resource tree: root, then books and authors, each a container."""

AUTHORS = {
    "ada": "Ada Lovelace",
    "alan": "Alan Turing",
    "grace": "Grace Hopper",
}
BOOKS = {
    "1": ("Notes on the Analytical Engine", "ada"),
    "2": ("On Computable Numbers", "alan"),
    "3": ("Computing Machinery and Intelligence", "alan"),
    "4": ("The Education of a Computer", "grace"),
}


class Resource:
    """A node of the tree: location-aware (``__name__``, ``__parent__``)."""

    def __init__(self, name, parent, title):
        self.__name__ = name
        self.__parent__ = parent
        self.title = title
        self.children = {}

    def add(self, child):
        self.children[child.__name__] = child
        return child

    def __getitem__(self, name):
        return self.children[name]


class Root(Resource):
    pass


class Books(Resource):
    def latest(self):
        return self.children[max(self.children, key=int)]


class Book(Resource):
    def __init__(self, name, parent, title, author):
        super().__init__(name, parent, title)
        self.author = author


class Authors(Resource):
    pass


class Author(Resource):
    def books(self):
        tree = self.__parent__.__parent__
        return [b for b in tree["books"].children.values() if b.author is self]


def build():
    root = Root("", None, "Library")
    books = root.add(Books("books", root, "Books"))
    authors = root.add(Authors("authors", root, "Authors"))
    for slug, name in AUTHORS.items():
        authors.add(Author(slug, authors, name))
    for number, (title, author) in BOOKS.items():
        books.add(Book(number, books, title, authors[author]))
    return root


# Built once: the tree is read-only, and every instance builds the same one.
TREE = build()


def root_factory(request):
    return TREE
