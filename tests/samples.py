"""The small Python module the editor and server tests open and type into."""

SAMPLE = '''\
import os
import sys


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def count_words(text):
    words = text.split()
    return len(words)


def main():
    total = 0
    for line in read_lines(sys.argv[1]):
        total += count_words(line)
    print(total)


if __name__ == "__main__":
'''
