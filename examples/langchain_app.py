"""A LangChain app on a Lorry deployment: `ChatOpenAI` pointed at its base URL with its key.

    export LORRY_BASE_URL=https://support-bot.lorry.example.com/v1   # the deployment's baseUrl
    export LORRY_API_KEY=lorry_…                                      # one of its keys
    python examples/langchain_app.py "How do I reset my password?"

Nothing Lorry-specific is needed: the deployment speaks the OpenAI API, and it decides which
model and adapter answer (the `model` name sent is ignored).
"""

from __future__ import annotations

import os
import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from pydantic import SecretStr


def main() -> int:
    question = " ".join(sys.argv[1:]) or "Hello! What can you do?"
    llm = ChatOpenAI(
        base_url=os.environ["LORRY_BASE_URL"],
        api_key=SecretStr(os.environ["LORRY_API_KEY"]),
        model="deployment",
        max_completion_tokens=64,
    )
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a concise, helpful assistant."), ("human", "{question}")]
    )
    chain = prompt | llm | StrOutputParser()

    print(f"Reply: {chain.invoke({'question': question})}")
    streamed = "".join(chain.stream({"question": question}))
    print(f"Streamed reply: {streamed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
