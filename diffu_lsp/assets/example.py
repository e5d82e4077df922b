import os


def count_lines(path):
    """Return the number of lines in the file at path."""
    with open(path) as f:
        
    return total


def list_python_files(folder):
    result = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            result.append(os.path.join(folder, name))
    return result
