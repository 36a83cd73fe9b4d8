// Token comparison and token-file parsing of the server's authenticator.
#include "server/security.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

namespace kvcompact::server {
namespace {

TEST(ConstantTimeEquals, EqualOnlyForIdenticalStrings) {
  EXPECT_TRUE(ConstantTimeEquals("abcdef0123456789", "abcdef0123456789"));
  EXPECT_FALSE(ConstantTimeEquals("abcdef0123456789", "abcdef012345678"));    // prefix
  EXPECT_FALSE(ConstantTimeEquals("abcdef0123456789", "abcdef0123456789a"));  // longer
  EXPECT_FALSE(ConstantTimeEquals("abcdef0123456789", "abcdef0123456788"));   // last byte
  EXPECT_FALSE(ConstantTimeEquals("abcdef0123456789", "abcdef0123456789abcdef0123456789"));  // repeated
  EXPECT_FALSE(ConstantTimeEquals("abcdef0123456789", ""));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
}

TEST(TokenAuthenticator, FileHoldsSeveralTokensAndComments) {
  const std::string path = ::testing::TempDir() + "/tokens";
  std::ofstream(path) << "# rotation: old and new\r\nfirst-token-0123456789\n\n  second-token-0123456789  \n";
  auto auth = TokenAuthenticator::Load(path, "ignored-env-token-0123456789");
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_TRUE(auth->enabled());
  EXPECT_EQ(auth->token_count(), 2u);
  std::remove(path.c_str());
}

TEST(TokenAuthenticator, EnvironmentIsUsedWithoutAFileAndNothingMeansDisabled) {
  auto from_env = TokenAuthenticator::Load("", "env-token-0123456789");
  ASSERT_TRUE(from_env.ok());
  EXPECT_EQ(from_env->token_count(), 1u);
  auto none = TokenAuthenticator::Load("", "");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->enabled());
  EXPECT_FALSE(TokenAuthenticator::Load("", "short").ok());
  EXPECT_FALSE(TokenAuthenticator::Load("/nonexistent/tokens", "").ok());
}

TEST(ServerCredentials, PlaintextUnlessCertificateAndKeyAreBothNamed) {
  EXPECT_TRUE(MakeServerCredentials({}).ok());
  EXPECT_FALSE(MakeServerCredentials({"cert.pem", "", ""}).ok());
  EXPECT_FALSE(MakeServerCredentials({"", "key.pem", ""}).ok());
  EXPECT_FALSE(MakeServerCredentials({"", "", "ca.pem"}).ok());
}

}  // namespace
}  // namespace kvcompact::server
